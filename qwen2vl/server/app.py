"""The FastAPI app: routes, API-key check, body limits, admission (bounded queue), request counting.

    app = create_app(AsyncLLM(folder), ServerLimits(), api_key="secret", model_name="qwen2vl")

A request's `model` picks the base model (its served name) or one of the engine's LoRA adapters (by name).

Routes: POST /v1/chat/completions, POST /v1/responses (and GET /v1/responses/{id} for a stored one),
POST /v1/embeddings, POST /v1/token_count, GET /v1/models,
GET /metrics, GET /health (the only one without the key), and GET / for the web page when it is
installed. A shut-down engine answers 503.
"""

import asyncio
import hmac
import json
import time

from fastapi import Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from qwen2vl.engine.async_engine import AsyncLLM, EngineStopped
from qwen2vl.server import inputs as chat_inputs
from qwen2vl.server.chat import ChatService
from qwen2vl.server.embeddings import EmbeddingRequest, EmbeddingService
from qwen2vl.server.errors import (
    APIError,
    bad_request,
    error_response,
    first_param,
    format_validation_error,
    install_error_handlers,
    internal_error,
    sse_error,
)
from qwen2vl.server.limits import ServerLimits
from qwen2vl.server.metrics import Metrics
from qwen2vl.server.protocol import ChatCompletionRequest, model_card
from qwen2vl.server.response_store import ResponseStore
from qwen2vl.server.responses import ResponsesService
from qwen2vl.server.responses_protocol import ResponsesRequest
from qwen2vl.server.structured import GrammarCompiler
from qwen2vl.server.web import add_web_page

RETRY_AFTER_S = "1"


def create_app(engine: AsyncLLM, limits: ServerLimits, *, api_key: str | None = None,
               model_name: str = "qwen2vl") -> FastAPI:
    """`engine`: a running AsyncLLM, or a ReplicaPool (qwen2vl/replicas) in front of engine replicas: the
    same generate/embed/stats/served/stopped; requests are served under `limits`; `api_key` None: no key."""
    app = FastAPI(title="qwen2vl", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    metrics = Metrics(model_name)
    served = engine.served
    # the engine's processor, with the server's media policy instead of the permissive default
    processor = served.processor.with_policy(limits.media_policy())
    tok = processor.tokenizer
    max_model_len = served.max_model_len
    compiler = GrammarCompiler(tok.backend.to_str(), served.config.text.vocab_size, served.eos_token_ids)
    service = ChatService(engine, processor, served.config, limits, metrics, compiler, served.defaults,
                          model_name, max_model_len)
    responder = ResponsesService(service, ResponseStore(limits.max_stored_responses, limits.max_stored_bytes))
    embedder = EmbeddingService(engine, processor, served.config, limits, metrics, model_name, max_model_len)
    app.state.service, app.state.metrics = service, metrics
    app.add_middleware(_CountRequests, metrics=metrics)

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(authorized)]

    @app.exception_handler(EngineStopped)
    async def _stopped(_request: Request, exc: EngineStopped):
        return error_response(engine_stopped(exc.failure))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    adapters = served.lora_names  # LoRA adapters are served as models of their own names

    @app.get("/v1/models", dependencies=auth)
    async def models():
        cards = [model_card(model_name, max_model_len)]
        cards += [{**model_card(name, max_model_len), "parent": model_name} for name in adapters]
        return {"object": "list", "data": cards}

    @app.get("/metrics", dependencies=auth)
    async def prometheus():
        replicas = getattr(engine, "health", None)  # a ReplicaPool's: replicas up, requests re-run
        return PlainTextResponse(metrics.render(engine.stats(), replicas), media_type="text/plain; version=0.0.4")

    @app.post("/v1/token_count", dependencies=auth)
    async def token_count(request: Request):
        body = await read_json(request, limits.max_body_bytes)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("messages: a non-empty list is required", "messages")
        allowed = ["messages", "mm_processor_kwargs", "model", "add_generation_prompt", "continue_final_message",
                   "chat_template_kwargs"]
        unknown = sorted(set(body) - set(allowed))
        if unknown:
            raise bad_request(f"unknown field(s) {unknown}; allowed: {', '.join(allowed)}", unknown[0])
        cfg = processor.vision
        inputs = chat_inputs.check_inputs(messages, body.get("mm_processor_kwargs"), limits, cfg, tok.find_special)
        template = chat_inputs.template_options(body.get("add_generation_prompt"), body.get("continue_final_message"),
                                                body.get("chat_template_kwargs"), tok.find_special)
        await asyncio.to_thread(chat_inputs.fetch_media, inputs.media, service.policy, limits)
        costs = await asyncio.to_thread(chat_inputs.media_costs, inputs.media, cfg, limits)
        try:
            text = processor.apply_chat_template(chat_inputs.qwen_messages(inputs), **template)
        except ValueError as e:
            raise bad_request(str(e), "messages") from None
        text_tokens = len(tok.encode(text, allow_special=True)) - len(costs)  # minus one pad per item
        visual = sum(c.tokens for c in costs)
        return {"prompt_tokens": text_tokens + visual, "text_tokens": text_tokens, "visual_tokens": visual,
                "max_model_len": max_model_len, "items": [c.to_dict() for c in costs]}

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name and name not in adapters:
            served = ", ".join(repr(m) for m in [model_name, *adapters])
            raise APIError(404, f"model: {name!r} is not served here; this server serves {served}",
                           param="model", code="model_not_found")

    def admit() -> None:
        """One more request in flight, or a 429 past --max-queue (the caller decrements when done)."""
        if engine.stopped:  # before a stream starts: its status can still say so
            raise engine_stopped(engine.failure)
        if metrics.in_flight >= limits.max_queue:
            metrics.rejected += 1
            raise APIError(429, f"server busy: {metrics.in_flight} requests in flight, the limit is "
                                f"{limits.max_queue} (--max-queue); retry shortly",
                           code="queue_full", headers={"Retry-After": RETRY_AFTER_S})
        metrics.in_flight += 1

    @app.post("/v1/embeddings", dependencies=auth)
    async def embeddings(request: Request):
        body = await read_json(request, limits.max_body_bytes)
        req = parse_model(EmbeddingRequest, body)
        check_model(req.model)
        if req.model in adapters:
            raise bad_request(f"model: embeddings come from the base model {model_name!r}; LoRA adapters "
                              f"({req.model!r}) are applied to chat completions only", "model")
        admit()
        try:
            return await _unless_disconnected(embedder.embed(req), request, metrics)
        finally:
            metrics.in_flight -= 1

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request):
        arrival = time.monotonic()
        body = await read_json(request, limits.max_body_bytes)
        req = parse_model(ChatCompletionRequest, body)
        check_model(req.model)
        admit()
        try:
            prepared = await service.prepare(req)
        except BaseException:
            metrics.in_flight -= 1
            raise
        if req.stream:
            return StreamingResponse(_released(_sse(service.stream(req, prepared, arrival)), metrics),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            return await _unless_disconnected(service.complete(req, prepared, arrival), request, metrics)
        finally:
            metrics.in_flight -= 1

    @app.post("/v1/responses", dependencies=auth)
    async def responses(request: Request):
        arrival = time.monotonic()
        req = parse_model(ResponsesRequest, await read_json(request, limits.max_body_bytes))
        check_model(req.model)
        admit()
        try:
            turn = await responder.prepare(req)
        except BaseException:
            metrics.in_flight -= 1
            raise
        if req.stream:
            return StreamingResponse(_released(_sse(responder.stream(turn, arrival)), metrics),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            return await _unless_disconnected(responder.complete(turn, arrival), request, metrics)
        finally:
            metrics.in_flight -= 1

    @app.get("/v1/responses/{response_id}", dependencies=auth)
    async def stored_response(response_id: str):
        return responder.response(response_id)

    add_web_page(app)  # if installed; static, holds no data, so no key; the page sends the key with its API calls

    return app


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, refusing more than `limit` bytes without reading them all."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body is {int(length):,} bytes, over the limit of {limit:,} (--max-body-mb)")
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise APIError(413, f"request body is over the limit of {limit:,} bytes (--max-body-mb)")
        chunks.append(part)
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"body: not valid JSON ({e})", "body") from None
    if not isinstance(body, dict):
        raise bad_request(f"body: must be a JSON object, got {type(body).__name__}", "body")
    return body


def parse_model(model: type[BaseModel], body: dict):
    try:
        return model.model_validate(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        raise bad_request(format_validation_error(errors), first_param(errors)) from None


def engine_stopped(failure: str | None = None) -> APIError:
    """503: the server is stopping, or (`failure`) its engine failed for good and the server exits."""
    why = "the engine is shut down" if failure is None else f"the engine failed: {failure}"
    return APIError(503, f"{why} (the server is stopping); retry on another server", code="engine_stopped")


async def _sse(lines):
    """Errors after the stream has started can't change the status code: send one error event."""
    try:
        async for line in lines:
            yield line
    except APIError as e:
        yield sse_error(e)
    except EngineStopped as e:
        yield sse_error(engine_stopped(e.failure))
    except Exception as e:  # a real fault mid-stream: logged, reported, the server goes on
        yield sse_error(internal_error(e, "chat stream"))


async def _released(lines, metrics: Metrics):
    try:
        async for line in lines:
            yield line
    except BaseException:
        metrics.aborted += 1  # cancelled: the client went away
        raise
    finally:
        metrics.in_flight -= 1


async def _unless_disconnected(work, request: Request, metrics: Metrics, poll_s: float = 0.25):
    """Run `work`; if the client disconnects first, cancel it (which aborts the engine request)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=poll_s)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            metrics.aborted += 1
            raise APIError(499, "client disconnected")


class _CountRequests:
    """ASGI middleware counting responses by endpoint and status (streams included)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ("/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/token_count",
                                    "/v1/models", "/metrics", "/health", "/") else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.count_request(endpoint, message["status"])
            await send(message)

        return await self.app(scope, receive, counting_send)
