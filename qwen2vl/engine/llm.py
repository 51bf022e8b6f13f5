"""`LLM`: the synchronous Python API.

    llm = LLM("/path/to/Qwen2-VL-2B-Instruct", dtype="bfloat16", device="cpu")
    outs = llm.chat(messages, SamplingParams(temperature=0, max_tokens=128))   # one conversation
    outs = llm.chat([conv_a, conv_b], params)                                # one output each, in order
    for chunk in llm.stream(messages, params): print(chunk, end="")          # str increments
    llm.chat(messages + [{"role": "assistant", "content": "The answer is"}], params,
             continue_final_message=True)                                     # continue a prefilled answer

Everything submitted together runs batched (continuous batching inside the engine). LoRA adapters
(PEFT format, e.g. from `qwen2vl train`): `LLM(folder, lora="adapter/")` applies one to every request;
`LLM(folder, lora={"forms": "a/", "receipts": "b/"})` loads several, and `chat(..., lora="forms")` picks
one per request (default: the base model); requests with different adapters are batched together.

    vecs = llm.embed(["a cat", {"messages": [{"role": "user", "content": [image, "a cat"]}]}])  # [2, D]

embeds (embedding.py): last-token pooling of the final hidden state, L2-normalized, unless the
checkpoint's sentence-transformers files say otherwise; `dimensions` truncates (Matryoshka).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import torch

from qwen2vl.adapter import read_adapter
from qwen2vl.backends import MATMULS, prepare
from qwen2vl.backends.quant import QUANTIZATIONS
from qwen2vl.embedding import as_inputs, check_dimensions, embedding_prompt, finish, read_pooling
from qwen2vl.engine.engine import Engine, EngineConfig
from qwen2vl.engine.outputs import RequestOutput, TextChunk
from qwen2vl.engine.prompt import Prompt
from qwen2vl.engine.sampling_params import SamplingParams, generation_defaults, generation_eos_ids
from qwen2vl.hub import resolve_model_path
from qwen2vl.loader import checkpoint_dtype
from qwen2vl.lora import attach_adapters
from qwen2vl.model import Qwen2VL
from qwen2vl.processing.processor import OWN_ARGUMENTS, Processor

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


class LLM:
    def __init__(self, model: str | Path, *, dtype: str | torch.dtype = "bfloat16", device: str = "cpu",
                 quantization: str | None = None, lora: str | Path | dict[str, str | Path] | None = None,
                 tensor_parallel_size: int = 1, matmul: str | None = None, **engine_args):
        """`lora`: an adapter folder used by every request, or {name: folder} to pick per request.
        `tensor_parallel_size` N > 1: the decoder split over N processes, this one rank 0 (parallel/;
        `close()` stops the others). `matmul="int8"` (CPU): the vision tower and prefill in int8,
        weights per channel, activations per token (faster time to first token where the CPU has no
        bf16 matmul; docs/performance.md). `engine_args` are EngineConfig fields: kv_cache_gib (per
        rank), gpu_memory_utilization, block_size, max_model_len, max_num_seqs,
        max_num_batched_tokens, enable_prefix_caching, vision_cache_mib, seed."""
        dtype = parse_dtype(dtype)  # argument errors before any download or load
        if quantization is not None and quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be None or one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
        if matmul is not None and matmul not in MATMULS:
            raise ValueError(f"matmul must be None or one of {', '.join(MATMULS)}, got {matmul!r}")
        if not isinstance(tensor_parallel_size, int) or isinstance(tensor_parallel_size, bool) or \
                tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an int >= 1, got {tensor_parallel_size!r}")
        if tensor_parallel_size > 1 and lora is not None:
            raise ValueError("LoRA adapters are not served with tensor parallelism yet; use tensor_parallel_size=1")
        if tensor_parallel_size > 1 and matmul is not None:
            raise ValueError(f"matmul={matmul!r} is not applied under tensor parallelism yet; "
                             "use tensor_parallel_size=1")
        config = EngineConfig(**engine_args)
        adapters = {name: read_adapter(path) for name, path in _adapter_folders(lora).items()}
        if adapters or tensor_parallel_size > 1:
            # CUDA graphs would capture one step's adapter slots, or leave the other ranks out of a replay
            config.enforce_eager = True
        self.lora_names = list(adapters)
        self.default_lora = self.lora_names[0] if isinstance(lora, (str, Path)) else None
        folder = resolve_model_path(model)
        self.tp = None  # rank 0's TensorParallel, when the decoder is split
        if tensor_parallel_size > 1:
            from qwen2vl.parallel.group import TensorParallel

            self.tp = TensorParallel(folder, dtype, device, quantization, tensor_parallel_size)
            self.model = self.tp.model
        else:
            self.model = load_model(folder, dtype, device, quantization, matmul)
        if adapters:
            attach_adapters(self.model, adapters)
        self.processor = Processor.from_pretrained(folder)
        self.defaults = generation_defaults(folder)
        self.pooling = read_pooling(folder)  # how embed() pools and whether it normalizes by default
        eos = self.processor.eos_token_ids + generation_eos_ids(folder) + _ids(self.model.config.eos_token_id)
        self.engine = Engine(self.model, config, self.processor.tokenizer, list(dict.fromkeys(eos)))
        if self.tp is not None:
            self.tp.size_cache(self.engine.cache)
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (also done when the LLM is garbage-collected)."""
        if self.tp is not None:
            self.tp.close()

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

    def chat(self, messages, params: SamplingParams | list[SamplingParams] | None = None, *,
             lora: str | list[str | None] | None = None, **processor_args) -> list[RequestOutput]:
        """One conversation (a list of messages) or a list of conversations -> one output each;
        `processor_args` as `prompt` takes them (continue_final_message, chat_template_kwargs, ...)."""
        conversations = [messages] if _is_conversation(messages) else list(messages)
        return self.generate([self.prompt(c, **processor_args) for c in conversations], params, lora=lora)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None, *,
                 lora: str | list[str | None] | None = None) -> list[RequestOutput]:
        """Prompts as `Prompt`s, processor dicts or token-id lists; outputs in the same order.
        `lora`: the adapter name for all prompts, or one per prompt (None: the default)."""
        prompts = [self._as_prompt(p) for p in (prompts if isinstance(prompts, list) and
                                                not _is_token_list(prompts) else [prompts])]
        if isinstance(params, list) and len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        if isinstance(lora, list) and len(lora) != len(prompts):
            raise ValueError(f"{len(lora)} adapter names for {len(prompts)} prompts")
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        slots = [self.lora_slot(name) for name in (lora if isinstance(lora, list) else [lora] * len(prompts))]
        requests = []
        try:
            for prompt, p, slot in zip(prompts, params_list, slots):
                p = p or self.default_sampling_params()
                requests.append(self.engine.add_request(str(next(self._ids)), prompt, p, lora=slot))
            while any(not r.finished for r in requests):
                self.engine.step()
        finally:  # an exception (or Ctrl-C) must not leave requests holding blocks
            for r in requests:
                self.engine.abort(r.request_id)
        return [r.output() for r in requests]

    def stream(self, messages, params: SamplingParams | None = None, *, lora: str | None = None,
               **processor_args) -> Iterator[TextChunk]:
        """Text increments of one conversation (first completion if n > 1) as they are generated.

        Each chunk is a str (so `"".join(...)` is the whole text) with `.token_ids`,
        `.finish_reason` and, on the last one, `.usage`. Leaving the loop early aborts the request.
        """
        prompt = self.prompt(messages, **processor_args) if not isinstance(messages, Prompt) else messages
        request_id = str(next(self._ids))
        self.engine.add_request(request_id, prompt, params or self.default_sampling_params(),
                                lora=self.lora_slot(lora))
        try:
            while True:
                for delta in self.engine.step():
                    if delta.request_id == request_id and delta.index == 0:
                        yield TextChunk(delta)
                        if delta.finished:
                            return
        finally:
            self.engine.abort(request_id)

    def embed(self, inputs, *, normalize: bool | None = None, dimensions: int | None = None,
              **processor_args) -> torch.Tensor:
        """[B, dimensions or D] float32 vectors, one per input, in order (all run batched).

        An input is a string, a list of token ids, or {"messages": [...]} with images/videos
        (embedding.py). `normalize` None: the checkpoint's setting (default: L2-normalized);
        `dimensions`: keep the first this many, then normalize (Matryoshka)."""
        items = as_inputs(inputs)
        if not items:
            raise ValueError("embed: no inputs")
        check_dimensions(dimensions, self.model.config.text.hidden_size)
        prompts = [embedding_prompt(x, self.processor, self.model.config, **processor_args) for x in items]
        vectors = self.engine.embed(prompts, self.pooling.mode)
        return finish(vectors, self.pooling.normalize if normalize is None else normalize, dimensions)

    def lora_slot(self, name: str | None) -> int:
        """The engine's slot for adapter `name` (None: the default adapter, else the base model: 0)."""
        name = name if name is not None else self.default_lora
        if name is None:
            return 0
        if name not in self.lora_names:
            raise ValueError(f"no LoRA adapter named {name!r}; loaded: {self.lora_names or 'none'}")
        return self.lora_names.index(name) + 1

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


def load_model(folder: Path, dtype: torch.dtype | None, device, quantization: str | None,
               matmul: str | None = None) -> Qwen2VL:
    """The checkpoint in `folder` on `device`, with its backend's speed-ups swapped in (backends/)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; use device='cpu'")
    # the CPU backend replaces every half-precision or quantized linear by a repacked copy: map
    # those weights rather than read them into memory that is dropped right after (loader.py)
    half = (dtype or checkpoint_dtype(folder)) in (torch.bfloat16, torch.float16)
    model = Qwen2VL.from_pretrained(folder, dtype=dtype, device=device,
                                    map_linears=device.type == "cpu" and (half or quantization is not None))
    prepare(model, quantization, matmul, checkpoint=folder)
    return model


def _adapter_folders(lora) -> dict[str, Path]:
    """{name: folder} from LLM's `lora` argument; a lone folder is named after itself."""
    if lora is None:
        return {}
    if isinstance(lora, (str, Path)):
        return {Path(lora).name or str(lora): Path(lora)}
    if not isinstance(lora, dict) or not all(isinstance(k, str) and k for k in lora):
        raise ValueError("lora must be an adapter folder or a dict {name: folder}")
    return {name: Path(path) for name, path in lora.items()}


def _is_conversation(messages) -> bool:
    return isinstance(messages, list) and (not messages or isinstance(messages[0], dict))


def _is_token_list(x) -> bool:
    return bool(x) and isinstance(x[0], int)


def _ids(x) -> list[int]:
    return [] if x is None else [x] if isinstance(x, int) else list(x)
