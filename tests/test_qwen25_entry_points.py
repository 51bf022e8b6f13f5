"""A Qwen2.5-VL checkpoint through the entry points and fast paths Qwen2-VL's take: `qwen2vl info`
and `chat`, the server (a video's sampled fps reaches its positions), bf16 on the CPU backend
(FastLinears, C kernels, the float32 compute policy at a tier without bf16 matmuls), int8/int4."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from openai import OpenAI

from qwen2vl import LLM, Qwen2VL, SamplingParams
from qwen2vl.backends.cpu.linear import FastLinear
from qwen2vl.server.limits import ServerLimits
from qwen2vl.text import RMSNorm
from tests.helpers.checkpoints import build_reference, save_checkpoint
from tests.helpers.media import data_uri, mp4_bytes, png_bytes
from tests.helpers.parity import PREPROCESSOR
from tests.helpers.qwen_tokenizer import qwen_tokenizer_dir
from tests.helpers.server import running_server
from tests.helpers.tiers import TIERS_HERE, at_tier

REPO = Path(__file__).resolve().parents[1]
VIDEO = data_uri(mp4_bytes(frames=8, width=64, height=48, fps=4), "video/mp4")
IMAGE = data_uri(png_bytes(120, 90))
SMALL = {"min_pixels": 28 * 28 * 16, "max_pixels": 28 * 28 * 16}  # within the server's ceilings: no clamping
QUESTION = [{"type": "video", "video": VIDEO, "fps": 4.0, **SMALL}, {"type": "image", "image": IMAGE},
            {"type": "text", "text": "What happens?"}]
BOUNDS = {"int8": 0.06, "int4": 0.45}  # relative RMS of the logits vs bf16, as tests/test_quant_model.py


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny25")
    hf = build_reference(family="qwen2_5_vl", vocab_size=151936, vision_depth=3, window_size=56, fullatt=(1,))
    save_checkpoint(hf, folder, tokenizer_dir=qwen_tokenizer_dir())
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return folder


def qwen2vl(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "qwen2vl", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=180)


def test_info_names_the_family_and_its_windows(ckpt):
    r = qwen2vl("info", ckpt)
    assert r.returncode == 0, r.stderr
    assert "qwen2_5_vl" in r.stdout and "windows of 56 px (whole frames in blocks 1)" in r.stdout


def test_one_shot_chat_answers_as_the_engine(ckpt, tmp_path):
    (tmp_path / "clip.mp4").write_bytes(mp4_bytes(frames=8, width=64, height=48, fps=4))
    r = qwen2vl("chat", "--model", ckpt, "--video", tmp_path / "clip.mp4", "--fps", 4, "--dtype", "float32",
                "--kv-cache-gib", 0.05, "--max-tokens", 6, "--temperature", 0, "What happens?")
    assert r.returncode == 0, r.stderr
    llm = LLM(ckpt, dtype="float32", kv_cache_gib=0.05)
    messages = [{"role": "user", "content": [{"type": "video", "video": str(tmp_path / "clip.mp4"), "fps": 4.0},
                                             {"type": "text", "text": "What happens?"}]}]
    want = llm.chat(messages, SamplingParams(temperature=0, max_tokens=6, skip_special_tokens=False))[0].text
    assert r.stdout == want + "\n"


def test_server_answers_as_the_engine_with_the_videos_time(ckpt):
    content = [{"type": "video_url", "video_url": {"url": VIDEO, "fps": 4, **SMALL}},
               {"type": "image_url", "image_url": {"url": IMAGE}}, {"type": "text", "text": "What happens?"}]
    with running_server(ServerLimits(), api_key="k", model=ckpt) as (url, _):
        client = OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                           max_tokens=5, temperature=0, logprobs=True)
    llm = LLM(ckpt, dtype="float32", kv_cache_gib=0.02, max_model_len=2048)
    prompt = llm.prompt([{"role": "user", "content": QUESTION}])
    video = prompt.vision[0]
    time = prompt.positions[0, video.offset:video.end].unique() - video.offset
    assert time.tolist() == [0, 1, 2, 3]  # 8 frames at 4 fps: 0.5 s a grid step x 2 positions a second
    (ref,) = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=5, logprobs=0))
    assert r.usage.prompt_tokens == len(prompt)
    assert r.choices[0].message.content == ref.text
    got = [t.logprob for t in r.choices[0].logprobs.content]
    torch.testing.assert_close(torch.tensor(got), torch.tensor([lp.logprob for lp in ref.logprobs]), atol=1e-4,
                               rtol=0)


def _vision_inputs():
    pixels = torch.randn(10 * 14, 1176, generator=torch.Generator().manual_seed(0))
    return pixels, torch.tensor([[1, 10, 14]])  # 5 x 7 merged tokens: windows of 2 x 2, cut short


def test_bf16_cpu_backend_swaps_in_its_fast_paths_with_the_same_answers(ckpt):
    llm = LLM(ckpt, dtype="bfloat16", kv_cache_gib=0.02)
    model, plain = llm.model, Qwen2VL.from_pretrained(ckpt, dtype=torch.bfloat16)
    block = model.visual.blocks[0]
    assert all(isinstance(m, FastLinear) for m in (block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj,
                                                     block.attn.qkv, model.visual.merger.mlp[0]))
    pixels, grid = _vision_inputs()
    fast, want = model.visual(pixels, grid).to(torch.bfloat16), plain.visual(pixels, grid)
    torch.testing.assert_close(fast, want, rtol=0.02, atol=0.02 * want.abs().max().item())
    prompt = llm.prompt([{"role": "user", "content": QUESTION}])
    inputs = llm.processor([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    fast_logits = model.logits(**inputs)
    plain_logits = plain.logits(**inputs)
    torch.testing.assert_close(fast_logits, plain_logits, rtol=0.03, atol=0.03 * plain_logits.abs().max().item())
    assert len(prompt) == len(inputs["input_ids"])


@pytest.mark.skipif("avx2" not in TIERS_HERE, reason="needs a CPU that can play the avx2 tier")
def test_bf16_weights_compute_in_float32_where_the_cpu_has_no_bf16_matmul(ckpt):
    pixels, grid = _vision_inputs()
    with at_tier("avx2"):  # built and run there: the kernels the linears were packed for are that tier's
        model = LLM(ckpt, dtype="bfloat16", kv_cache_gib=0.02).model
        got = model.visual(pixels, grid)
    norms = [m for m in model.visual.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * 3 + 1 and all(n.weight.dtype == torch.float32 for n in norms)
    want = Qwen2VL.from_pretrained(ckpt, dtype=torch.bfloat16).to(torch.float32).visual(pixels, grid)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_decoder_stays_close(ckpt, mode):
    inputs = LLM(ckpt, dtype="bfloat16", kv_cache_gib=0.02).processor([{"role": "user", "content": QUESTION}])
    want = Qwen2VL.from_pretrained(ckpt, dtype=torch.bfloat16).logits(**inputs)
    llm = LLM(ckpt, dtype="bfloat16", kv_cache_gib=0.02, quantization=mode)
    got = llm.model.logits(**inputs)
    rel = ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()
    assert rel < BOUNDS[mode], rel
    out = llm.chat([{"role": "user", "content": QUESTION}], SamplingParams(temperature=0, max_tokens=4))[0]
    assert len(out.token_ids) == 4
