"""POST /v1/embeddings: OpenAI's request (a string, strings, token ids, lists of token ids) plus
vLLM's chat-style inputs (`{"messages": [...]}` items, images and videos), under the chat
completions' auth, limits and media policy -> one vector per input.

    prepare():  schema -> each input: text, ids, or messages checked as a chat request's are
                (inputs.py, no I/O) -> media counted over the whole request -> fetch + headers
                (thread) -> processor (thread) -> Prompt -> length against max_model_len
    embed():    AsyncLLM.embed (engine thread, prefill only) -> truncate, normalize -> float or base64

The vectors are the checkpoint's pooling (embedding.py): last token of the final hidden state,
L2-normalized, unless its sentence-transformers files say otherwise; `"normalize": false` skips
the norm, `dimensions` keeps the first that many values and then normalizes (Matryoshka).
"""

import asyncio
import base64
from typing import Literal

import torch
from pydantic import StrictInt, field_validator

from qwen2vl.embedding import check_dimensions, embedding_prompt, finish
from qwen2vl.engine.embed import POOLING_MODES
from qwen2vl.processing.media import MediaError
from qwen2vl.server import inputs as chat_inputs
from qwen2vl.server.errors import APIError, bad_request
from qwen2vl.server.protocol import _Strict


class EmbeddingRequest(_Strict):
    input: str | list[StrictInt] | list[str | list[StrictInt] | dict]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None  # accepted for compatibility, unused
    # extras beyond OpenAI (vLLM's names)
    normalize: bool | None = None  # None: the checkpoint's setting (L2-normalized unless it says otherwise)
    mm_processor_kwargs: dict | None = None  # vision options for the images/videos of chat-style inputs

    @field_validator("input", mode="before")
    @classmethod
    def _one_shape(cls, v):
        """One message for any wrong shape (pydantic would list every branch of the union)."""
        def ids(x):
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(v, str) or ids(v) or (isinstance(v, list) and all(
                isinstance(x, (str, dict)) or ids(x) for x in v)):
            return v
        raise ValueError('must be a string, a list of token ids, or a list of strings, token-id lists and '
                         '{"messages": [...]} objects')


class EmbeddingService:
    def __init__(self, engine, processor, model_config, limits, metrics, model_name: str, max_model_len: int):
        self.engine = engine  # AsyncLLM
        self.processor = processor  # built with the server's MediaPolicy
        self.model_config = model_config
        self.limits = limits
        self.metrics = metrics
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.policy = limits.media_policy()
        self.pooling = engine.served.pooling

    async def embed(self, req: EmbeddingRequest) -> dict:
        if self.pooling.mode not in POOLING_MODES:
            raise bad_request(f"this checkpoint pools by {self.pooling.mode!r} ({self.pooling.source}), which this "
                              f"server does not support; supported: {', '.join(POOLING_MODES)}", "model")
        try:
            check_dimensions(req.dimensions, self.model_config.text.hidden_size)
        except ValueError as e:
            raise bad_request(str(e), "dimensions") from None
        prompts = await self.prepare(req)
        vectors = await self.engine.embed(prompts)
        vectors = finish(vectors, self.pooling.normalize if req.normalize is None else req.normalize, req.dimensions)
        tokens = sum(len(p) for p in prompts)
        self.metrics.prompt_tokens += tokens
        data = [{"object": "embedding", "index": i, "embedding": _encode(v, req.encoding_format)}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": self.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def prepare(self, req: EmbeddingRequest) -> list:
        single = isinstance(req.input, str) or (bool(req.input) and isinstance(req.input[0], int))
        items = [req.input] if single else req.input
        if not items:
            raise bad_request("input: an empty list; send at least one input", "input")
        if len(items) > self.limits.max_embedding_inputs:
            raise bad_request(f"input: {len(items)} inputs, over the limit of {self.limits.max_embedding_inputs} "
                              "(--max-embedding-inputs)", "input")
        where = ["input"] if single else [f"input[{i}]" for i in range(len(items))]
        checked = [self._check(item, w, req.mm_processor_kwargs) for item, w in zip(items, where)]
        chats = [(c, w) for c, w in zip(checked, where) if isinstance(c, chat_inputs.ChatInputs)]
        chat_inputs.check_counts([r for c, _ in chats for r in c.media], self.limits, "input")  # over all inputs
        for chat, w in chats:
            await asyncio.to_thread(_prefixed, w, chat_inputs.fetch_media, chat.media, self.policy, self.limits)
            costs = await asyncio.to_thread(_prefixed, w, chat_inputs.media_costs, chat.media, self.processor.vision,
                                            self.limits)
            _prefixed(w, chat_inputs.check_context, costs, self.max_model_len)
        prompts = []
        for c, w in zip(checked, where):
            prompt = await asyncio.to_thread(self._prompt, c, w)
            try:
                self.engine.served.validate_embed(prompt)
            except ValueError as e:
                raise bad_request(f"{w}: {e}" + ("; send less text or smaller images/videos" if prompt.vision else ""),
                                  w) from None
            prompts.append(prompt)
        return prompts

    def _check(self, item, where: str, mm_processor_kwargs):
        """Step 1, no I/O: a string, token ids, or chat inputs (inputs.check_inputs)."""
        if isinstance(item, str):
            if not item:
                raise bad_request(f"{where}: an empty string; send some text", where)
            return item
        if isinstance(item, list):
            if not item:
                raise bad_request(f"{where}: an empty list of token ids", where)
            return item
        messages = item.get("messages")
        if set(item) != {"messages"} or not isinstance(messages, list) or not messages:
            raise bad_request(f'{where}: a chat-style input is {{"messages": [...]}} with a non-empty list, '
                              f"got the fields {sorted(item)}", where)
        return _prefixed(where, chat_inputs.check_inputs, messages, mm_processor_kwargs, self.limits,
                         self.processor.vision, self.processor.tokenizer.find_special)

    def _prompt(self, checked, where: str):
        """Step 3 (a worker thread): tokenize, or decode the media and apply the chat template."""
        item = {"messages": chat_inputs.qwen_messages(checked)} if isinstance(checked, chat_inputs.ChatInputs) \
            else checked
        try:
            return embedding_prompt(item, self.processor, self.model_config, reject_special_tokens=True)
        except (MediaError, ValueError) as e:
            raise bad_request(f"{where}: {chat_inputs.public_message(str(e))}", where) from None


def _prefixed(where: str, fn, *args):
    """fn(*args), with an APIError's field named under this input (messages[0] -> input[2].messages[0])."""
    try:
        return fn(*args)
    except APIError as e:
        e.message = f"{where}.{e.message}"
        e.param = f"{where}.{e.param}" if e.param else where
        raise


def _encode(vector: torch.Tensor, encoding_format: str):
    if encoding_format == "float":
        return vector.tolist()
    # OpenAI's base64: the float32 values' little-endian bytes
    return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")

