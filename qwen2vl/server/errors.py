"""OpenAI-style error responses: every failure the client sees is `{"error": {...}}` with a 4xx/5xx.

    {"error": {"message": "temperature: must be <= 2, got 5", "type": "invalid_request_error",
               "param": "temperature", "code": null}}

Bad input raises `APIError` (or ValueError/MediaError from the processor and engine, which
`chat.py` turns into 400s). Anything else is a real fault: logged with its traceback on the
server, answered with a 500 that carries only an id to find it in the log, never the trace or
an internal address.
"""

import json
import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("qwen2vl.server")

# status -> OpenAI error type
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
         415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 503: "server_overloaded"}


class APIError(Exception):
    """A request the server refuses; `message` names the field and the limit."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error" if status < 500
                                                            else "server_error"),
                      "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.code), err.status, err.headers)


def sse_error(err: APIError) -> str:
    """The same error as one SSE event, for failures after a stream has started."""
    return f"data: {json.dumps(error_body(err.status, err.message, err.param, err.code))}\n\n"


def internal_error(exc: BaseException, where: str) -> APIError:
    """Log a real fault with its traceback and return the 500 the client sees."""
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s in %s", incident, where, exc_info=exc)
    return APIError(500, f"internal server error (incident {incident}); the server keeps serving",
                    code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException):
        # unknown routes and wrong methods, raised by the router itself
        message = {404: "no such endpoint", 405: "method not allowed on this endpoint"}.get(
            exc.status_code, str(exc.detail))
        return error_response(APIError(exc.status_code, message, headers=getattr(exc, "headers", None)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        return error_response(bad_request(format_validation_error(exc.errors())))

    @app.exception_handler(Exception)
    async def _fault(request: Request, exc: Exception):
        return error_response(internal_error(exc, f"{request.method} {request.url.path}"))


def format_validation_error(errors: list[dict]) -> str:
    """pydantic errors -> 'field: problem (got value)', the first three, joined."""
    parts = []
    for e in errors[:3]:
        where = _loc(e.get("loc", ()))
        got = e.get("input")
        got_text = "" if e.get("type") == "missing" or isinstance(got, (dict, list)) else f" (got {got!r:.60})"
        parts.append(f"{where}: {e.get('msg', 'invalid value')}{got_text}")
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


def first_param(errors: list[dict]) -> str | None:
    return _loc(errors[0].get("loc", ())) if errors else None


def _loc(loc) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'; pydantic's union-branch names dropped."""
    out = ""
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and ("[" in part or part.startswith(("function-", "literal"))):
            continue  # a union member's tag, not a field
        else:
            out += f".{part}" if out else str(part)
    return out or "body"
