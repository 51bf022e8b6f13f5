"""`ServedModel`: what a server in front of an engine needs to know about the model, and nothing heavy.

The server (qwen2vl/server) turns HTTP into prompts with the processor and checks them against the
engine's limits before any engine sees them. In one process those facts come from the loaded `LLM`
(`ServedModel.from_llm`); an ingress in front of engine replicas (qwen2vl/replicas) builds the same
facts from the checkpoint folder and one replica's answer, without loading a copy of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qwen2vl.config import Qwen2VLConfig
    from qwen2vl.embedding import Pooling
    from qwen2vl.engine.prompt import Prompt
    from qwen2vl.processing.processor import Processor


@dataclass
class ServedModel:
    processor: Processor
    config: Qwen2VLConfig  # token ids, vision merge, vocab and hidden sizes
    defaults: dict  # generation_config.json's sampling settings
    lora_names: list[str]  # adapters served as models of their own names
    pooling: Pooling  # how embeddings are pooled (embedding.read_pooling)
    max_model_len: int  # the engine's context: prompt + generated tokens
    eos_token_ids: list[int]

    @classmethod
    def from_llm(cls, llm) -> ServedModel:
        return cls(llm.processor, llm.model.config, llm.defaults, list(llm.lora_names), llm.pooling,
                   llm.engine.max_model_len, sorted(llm.engine.scheduler.eos_token_ids))

    def validate_embed(self, prompt: Prompt) -> None:
        validate_embed(prompt, self.max_model_len, self.config.text.vocab_size)


def validate_embed(prompt: Prompt, max_model_len: int, vocab: int) -> None:
    """What an engine can't embed, as a ValueError (an embedding generates nothing, so the whole
    context is the prompt's)."""
    if len(prompt) > max_model_len:
        raise ValueError(f"the input has {len(prompt)} tokens; this engine's max_model_len is {max_model_len}")
    bad = next((t for t in prompt.token_ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
