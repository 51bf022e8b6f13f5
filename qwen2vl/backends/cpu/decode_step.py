"""ctypes bindings of decode_step.c: the text decoder's whole decode step (every layer, the final norm)
as one C call over the same kernels the Python path calls one by one.

`DecodeStep.build(text_model, cache)` describes the model to C once: each linear's kernel and packed
weights, each layer's norms and KV cache. It returns None, and the runner keeps the Python path,
wherever a piece isn't one of our kernels: a linear on oneDNN or torch's int kernels, a model that
not running the C layer ops, a CPU or compiler without them. The description holds raw addresses, so it
is built after the model's modules and the cache are final and lives as long as the runner.
"""

from __future__ import annotations

import ctypes

import torch

from qwen2vl.backends.cpu import gemm, layer_ops, native
from qwen2vl.backends.cpu.untraced import untraced
from qwen2vl.rotary import mrope_cos_sin

BF16, INT8, INT4, BF16W, INT8G = 0, 1, 2, 3, 4  # Linear.kind, the enum in kernels.h


def library():
    return native.library("decode_step")


def _linear(module, keep: list):
    """The C description (kernels.h's Linear) of one of our kernels' linears, or None for any other."""
    from qwen2vl.backends.cpu.int8_mm import Int8RowsLinear
    from qwen2vl.backends.cpu.linear import FastLinear
    from qwen2vl.backends.int8_groups import Int8GroupLinear
    from qwen2vl.backends.quant import Int4Linear, Int8Linear

    if isinstance(module, Int8RowsLinear) and module.small is not None:
        module = module.small  # matmul="int8": decode rows run the linear beside the int8 codes, here too
    Linear = native.header().structs["Linear"]
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias = bias.to(torch.bfloat16).contiguous()  # the kernels read bf16 (int_gemv's caller converts per call)
        keep.append(bias)
    bias_ptr = None if bias is None else bias.data_ptr()
    if isinstance(module, FastLinear) and module.path == "bf16 kernel":
        return Linear(BF16, native.address(gemm.bf16_library().bf16_gemm), module.packed.data_ptr(), None, bias_ptr,
                      0, module.out_features, module.in_features, 0)
    # the same packed weights in fp32 arithmetic, FastLinear's path on CPUs without AVX-512 BF16
    if isinstance(module, FastLinear) and module.path == "bf16w kernel" and gemm.bf16w_library() is not None:
        return Linear(BF16W, native.address(gemm.bf16w_library().bf16w_gemm), module.packed.data_ptr(), None,
                      bias_ptr, 0, module.out_features, module.in_features, 0)
    # the int kinds: int_gemv, and from gemm.AMX_CODES_ROWS rows the AMX tiles where they are on (as _call)
    lib = gemm.amx_codes_library()
    amx = lambda kind: (None, 0) if lib is None else (native.address(lib.bf16_gemm_codes), gemm.AMX_CODES_ROWS[kind])
    if isinstance(module, (Int8Linear, Int4Linear)) and module.blocked and gemm.int_library() is not None:
        int8 = isinstance(module, Int8Linear)
        w, scales = (module.weight, module.scales) if int8 else (module.packed, module.scales_zeros)
        fn = gemm.int_library().int8_gemm if int8 else gemm.int_library().int4_gemm
        return Linear(INT8 if int8 else INT4, native.address(fn), w.data_ptr(), scales.data_ptr(), bias_ptr,
                      int(scales.dtype == torch.bfloat16), module.out_features, module.in_features,
                      0 if int8 else module.group_size, *amx(INT8 if int8 else INT4))
    if isinstance(module, Int8GroupLinear) and gemm.int_library() is not None:  # a GPTQ-Int8 checkpoint's
        return Linear(INT8G, native.address(gemm.int_library().int8g_gemm), module.weight.data_ptr(),
                      module.scales_zeros.data_ptr(), bias_ptr, int(module.scales_zeros.dtype == torch.bfloat16),
                      module.out_features, module.in_features, module.group_size, *amx(INT8G))
    return None


class DecodeStep:
    def __init__(self, decoder, layers, keep: list, cfg):
        self.decoder, self._layers, self._keep, self.cfg = decoder, layers, keep, cfg
        self.work_per_token = library().decode_step_work(ctypes.byref(decoder))

    @classmethod
    def build(cls, text_model, cache) -> DecodeStep | None:
        """For a TextModel running the C layer ops (bf16, fused qkv) whose every decoder linear is one
        of our kernels' and the engine's KVCache; None where that isn't so."""
        from qwen2vl.backends.kernel_ops import TextKernels

        if not isinstance(text_model.ops, TextKernels) or library() is None or not layer_ops.available():
            return None
        cfg, ops, keep = text_model.cfg, layer_ops.library(), []
        eps = {n.eps for layer in text_model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)}
        if len(eps | {text_model.norm.eps}) != 1 or cache.k.dtype != torch.bfloat16 or not cfg.num_hidden_layers:
            return None
        structs = native.header().structs
        layers = (structs["Layer"] * cfg.num_hidden_layers)()
        for i, layer in enumerate(text_model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            if mlp.gate_up_proj is not None:  # fused gate|up (a CUDA model's layout): not described here
                return None
            linears = [_linear(m, keep) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                                                  mlp.down_proj)]
            if any(lin is None for lin in linears):
                return None
            k_cache, v_cache = cache.layers[i]
            assert k_cache.is_contiguous() and v_cache.is_contiguous()
            norm1, norm2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
            layers[i] = structs["Layer"](norm1.data_ptr(), norm2.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                         *linears)
        decoder = structs["Decoder"](
            native.address(ops.rms_norm), native.address(ops.rotary), native.address(ops.silu_mul),
            native.address(layer_ops.attention_library().paged_decode),
            cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim, eps.pop(), text_model.norm.weight.data_ptr(),
            ctypes.addressof(layers))
        return cls(decoder, layers, keep, cfg)

    @untraced  # a ctypes call: dynamo can't trace it
    def __call__(self, x: torch.Tensor, positions: torch.Tensor, batch) -> torch.Tensor:
        """x [M, D] bf16 embeddings of M decoding tokens, positions [3, M], batch the runner's
        PagedBatch -> final-normed hidden states [M, D]; writes the tokens' k/v to the cache."""
        m, d = x.shape
        cfg = self.cfg
        cos, sin = mrope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, x.dtype)
        assert x.is_contiguous() and cos.is_contiguous() and sin.is_contiguous() and batch.ctx_slots.stride(1) == 1
        out = torch.empty(m, d, dtype=x.dtype)
        work = torch.empty(m * self.work_per_token, dtype=x.dtype)
        rc = library().decode_step(ctypes.byref(self.decoder), x.data_ptr(), out.data_ptr(), cos.data_ptr(),
                                   sin.data_ptr(), batch.slot_mapping.data_ptr(), batch.ctx_slots.data_ptr(),
                                   batch.ctx_slots.stride(0), batch.ctx_lens_t.data_ptr(), m, work.data_ptr(),
                                   torch.get_num_threads())
        if rc != 0:
            raise MemoryError("decode_step: a kernel ran out of memory for its scratch")
        return out
