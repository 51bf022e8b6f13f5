"""The inference engine: paged KV cache, continuous batching, prefix and vision caching, sampling.

Public entry points: `LLM` (synchronous), `AsyncLLM` (asyncio, for the server), `SamplingParams`.
"""
