#!/usr/bin/env bash
# llama.cpp beside us, outside the repo: build it from the source vendored in the llama-cpp-python
# sdist (PyPI is reachable, GitHub may not be), convert a checkpoint folder with its own converter,
# quantize, and run llama-bench the way benchmarks/ compares against it.
#
#   benchmarks/llama_cpp.sh build DIR [avx2]           # ~8 min on 2 cores; DIR/bin holds the tools;
#                                                      # avx2: AVX2+FMA+F16C only, as a Zen 3 (our avx2 tier)
#   benchmarks/llama_cpp.sh convert DIR CHECKPOINT     # DIR/model-{bf16,q8_0,q4_0}.gguf (text decoder)
#   benchmarks/llama_cpp.sh bench DIR [THREADS]        # llama-bench -p 283 -n 64 -r 3 on each gguf
set -euo pipefail
cmd=$1 dir=$(realpath -m "$2")
version=0.3.36  # vendors llama.cpp 0c1e570 (2026-10-01), the build REFERENCE.md §6.3-6.4 measured
case $cmd in
build)
  mkdir -p "$dir" && cd "$dir"
  # the sdist itself, from PyPI's simple index (pip download would build its build dependencies from source)
  url=$(curl -fsS https://pypi.org/simple/llama-cpp-python/ | grep -o "https://[^\"#]*llama_cpp_python-$version.tar.gz" | head -1)
  [ -d src ] || { curl -fsSL "$url" -o sdist.tar.gz && mkdir src && tar xzf sdist.tar.gz -C src --strip-components=1; }
  isa=(-DGGML_NATIVE=ON)
  [ "${3:-}" = avx2 ] && isa=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
                              -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF)
  cmake -S src/vendor/llama.cpp -B build "${isa[@]}" -DCMAKE_BUILD_TYPE=Release -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF >/dev/null
  cmake --build build -j2 --target llama-bench llama-quantize llama-mtmd-cli >/dev/null
  mkdir -p bin && cp build/bin/llama-bench build/bin/llama-quantize build/bin/llama-mtmd-cli bin/
  echo "built: $dir/bin";;
convert)
  ckpt=$3
  pip install -q sentencepiece gguf >/dev/null
  python "$dir/src/vendor/llama.cpp/convert_hf_to_gguf.py" "$ckpt" --outtype bf16 --outfile "$dir/model-bf16.gguf"
  for q in Q8_0 Q4_0; do "$dir/bin/llama-quantize" "$dir/model-bf16.gguf" "$dir/model-${q,,}.gguf" $q >/dev/null; done
  ls -l "$dir"/*.gguf;;
bench)
  for f in "$dir"/model-*.gguf; do "$dir/bin/llama-bench" -m "$f" -t "${3:-2}" -p 283 -n 64 -r 3; done;;
*) echo "usage: $0 build|convert|bench DIR ..." >&2; exit 2;;
esac
