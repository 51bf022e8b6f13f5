"""qwen2vl: Qwen2-VL from scratch in PyTorch, with an inference engine, server, CLI and web page."""

from qwen2vl.engine.async_engine import AsyncLLM
from qwen2vl.engine.llm import LLM
from qwen2vl.engine.sampling_params import SamplingParams
from qwen2vl.model import Qwen2VL
from qwen2vl.processing.processor import Processor

__all__ = ["AsyncLLM", "LLM", "Processor", "Qwen2VL", "SamplingParams"]
