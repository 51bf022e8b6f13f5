"""`LLM`: the synchronous Python API.

    llm = LLM("/path/to/Qwen2-VL-2B-Instruct", dtype="bfloat16", device="cpu")
    outs = llm.chat(messages, SamplingParams(temperature=0, max_tokens=128))   # one conversation
    outs = llm.chat([conv_a, conv_b], params)                                # one output each, in order
    for chunk in llm.stream(messages, params): print(chunk, end="")          # str increments
    llm.chat(messages + [{"role": "assistant", "content": "The answer is"}], params,
             continue_final_message=True)                                     # continue a prefilled answer

Everything submitted together runs batched (continuous batching inside the engine).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import torch

from qwen2vl.engine.engine import Engine, EngineConfig
from qwen2vl.engine.outputs import RequestOutput, TextChunk
from qwen2vl.engine.prompt import Prompt
from qwen2vl.engine.sampling_params import SamplingParams, generation_defaults, generation_eos_ids
from qwen2vl.fast_layers import speed_up_layers
from qwen2vl.fast_vision import speed_up_vision
from qwen2vl.hub import resolve_model_path
from qwen2vl.linear import speed_up_linears
from qwen2vl.model import Qwen2VL
from qwen2vl.processing.processor import OWN_ARGUMENTS, Processor
from qwen2vl.quant import QUANTIZATIONS, quantize_model

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


class LLM:
    def __init__(self, model: str | Path, *, dtype: str | torch.dtype = "bfloat16", device: str = "cpu",
                 quantization: str | None = None, **engine_args):
        """`engine_args` are EngineConfig fields: kv_cache_gib, gpu_memory_utilization, block_size,
        max_model_len, max_num_seqs, max_num_batched_tokens, enable_prefix_caching,
        vision_cache_mib, seed."""
        dtype = parse_dtype(dtype)  # argument errors before any download or load
        if quantization is not None and quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be None or one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
        config = EngineConfig(**engine_args)
        folder = resolve_model_path(model)
        self.model = load_model(folder, dtype, device, quantization)
        self.processor = Processor.from_pretrained(folder)
        self.defaults = generation_defaults(folder)
        eos = self.processor.eos_token_ids + generation_eos_ids(folder) + _ids(self.model.config.eos_token_id)
        self.engine = Engine(self.model, config, self.processor.tokenizer, list(dict.fromkeys(eos)))
        self._ids = itertools.count()

    def default_sampling_params(self, **overrides) -> SamplingParams:
        """generation_config.json's settings, with `overrides` on top."""
        return SamplingParams(**{**self.defaults, **overrides})

    def prompt(self, messages, *, add_generation_prompt: bool | None = None, continue_final_message: bool = False,
               chat_template_kwargs: dict | None = None, **processor_args) -> Prompt:
        """Messages (Qwen or OpenAI form) -> ids, pixels and positions, ready for the engine.

        As vLLM's: `add_generation_prompt` opens the assistant's turn (default: yes, unless
        `continue_final_message`, which leaves the last message open for the model to continue;
        both true is a ValueError); `chat_template_kwargs` are passed to the chat template (e.g.
        `{"add_vision_id": True}`), as are `processor_args` (tools, add_vision_id, ...)."""
        if add_generation_prompt is None:
            add_generation_prompt = not continue_final_message
        clash = sorted(set(chat_template_kwargs or {}) & (OWN_ARGUMENTS | set(processor_args)))
        if clash:
            raise ValueError(f"chat_template_kwargs: {clash} are the processor's own arguments, or given twice; "
                             "pass each once, as an argument")
        inputs = self.processor(messages, add_generation_prompt, continue_final_message=continue_final_message,
                                **(chat_template_kwargs or {}), **processor_args)
        return Prompt.from_inputs(inputs, self.model.config)

    def chat(self, messages, params: SamplingParams | list[SamplingParams] | None = None,
             **processor_args) -> list[RequestOutput]:
        """One conversation (a list of messages) or a list of conversations -> one output each;
        `processor_args` as `prompt` takes them (continue_final_message, chat_template_kwargs, ...)."""
        conversations = [messages] if _is_conversation(messages) else list(messages)
        return self.generate([self.prompt(c, **processor_args) for c in conversations], params)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Prompts as `Prompt`s, processor dicts or token-id lists; outputs in the same order."""
        prompts = [self._as_prompt(p) for p in (prompts if isinstance(prompts, list) and
                                                not _is_token_list(prompts) else [prompts])]
        if isinstance(params, list) and len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        requests = []
        try:
            for prompt, p in zip(prompts, params_list):
                p = p or self.default_sampling_params()
                requests.append(self.engine.add_request(str(next(self._ids)), prompt, p))
            while any(not r.finished for r in requests):
                self.engine.step()
        finally:  # an exception (or Ctrl-C) must not leave requests holding blocks
            for r in requests:
                self.engine.abort(r.request_id)
        return [r.output() for r in requests]

    def stream(self, messages, params: SamplingParams | None = None, **processor_args) -> Iterator[TextChunk]:
        """Text increments of one conversation (first completion if n > 1) as they are generated.

        Each chunk is a str (so `"".join(...)` is the whole text) with `.token_ids`,
        `.finish_reason` and, on the last one, `.usage`. Leaving the loop early aborts the request.
        """
        prompt = self.prompt(messages, **processor_args) if not isinstance(messages, Prompt) else messages
        request_id = str(next(self._ids))
        self.engine.add_request(request_id, prompt, params or self.default_sampling_params())
        try:
            while True:
                for delta in self.engine.step():
                    if delta.request_id == request_id and delta.index == 0:
                        yield TextChunk(delta)
                        if delta.finished:
                            return
        finally:
            self.engine.abort(request_id)

    def _as_prompt(self, p) -> Prompt:
        if isinstance(p, Prompt):
            return p
        if isinstance(p, dict):
            return Prompt.from_inputs(p, self.model.config)
        return Prompt.from_inputs({"input_ids": list(p)}, self.model.config)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype | None:
    """A torch dtype from its name; None for "auto" (the checkpoint's own dtype)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {dtype!r}")
    return None if dtype == "auto" else DTYPES[dtype]


def load_model(folder: Path, dtype: torch.dtype | None, device, quantization: str | None) -> Qwen2VL:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; use device='cpu'")
    model = Qwen2VL.from_pretrained(folder, dtype=dtype, device=device)
    model.fuse_qkv()
    if device.type == "cuda":
        model.fuse_gate_up()  # one launch fewer per layer in the decode graph (not on the CPU: no gain there)
    if quantization is not None:
        mode, group_size = QUANTIZATIONS[quantization]
        quantize_model(model, mode, group_size)
    if device.type == "cpu" and model.dtype in (torch.bfloat16, torch.float16):
        # decode streams every weight once per token; FastLinears (our bf16 kernel, else oneDNN)
        # stream at about the memory read rate where F.linear's bf16 GEMV gets ~30-70% of it, and
        # the vision tower's GEMMs run faster too (docs/performance.md). Quantized linears are not
        # nn.Linear and stay as they are; the patch embedding reads its weight's dtype, so it keeps
        # nn.Linear.
        speed_up_linears(model, skip=("visual",))
        # the vision tower's GEMMs are compute-bound: no huge pages, which cost load time (the
        # kernel compacts memory to find them)
        speed_up_linears(model.visual, skip=("patch_embed",), huge_pages=False)
        speed_up_vision(model)  # its QuickGELU, rotary and softmax as C kernels (bf16 only)
        # the decoder's norms, rotary, SiLU and decode attention as C kernels (bf16 only)
        speed_up_layers(model)
    elif device.type == "cuda":
        speed_up_layers(model)  # the decoder's norms, rotary and SiLU as Triton kernels (bf16 only)
        speed_up_vision(model)  # the vision tower's QuickGELU and rotary as Triton kernels (bf16 only)
    return model


def _is_conversation(messages) -> bool:
    return isinstance(messages, list) and (not messages or isinstance(messages[0], dict))


def _is_token_list(x) -> bool:
    return bool(x) and isinstance(x[0], int)


def _ids(x) -> list[int]:
    return [] if x is None else [x] if isinstance(x, int) else list(x)
