"""qwen2vl: Qwen2-VL from scratch in PyTorch, with an inference engine, server, CLI and web page."""

from qwen2vl.model import Qwen2VL
from qwen2vl.processing.processor import Processor

__all__ = ["Processor", "Qwen2VL"]
