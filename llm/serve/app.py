"""The HTTP routes of `llm serve` (a Starlette app): authentication, body limits, validation, OpenAI error bodies,
and the hand-over of generation requests to the engine (whole responses, or server-sent events).

Every error is a JSON body `{"error": {"message", "type", "param", "code"}}` with a 4xx status for anything the
client did wrong (401 bad key, 404 unknown model or route, 405 method, 413 body too large, 400 otherwise); a
failure inside the server is a 500 with the same body and no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import tiktoken
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from llm.chat import STOP, Message, prompt_ids
from llm.classifier import classify
from llm.errors import LLMError
from llm.generate import GenerationConfig
from llm.serve.engine import Delta, Done, Engine, Job
from llm.serve.loading import ENDPOINTS, ServedModel
from llm.serve.protocol import (
    ChatRequest,
    ClassificationRequest,
    CompletionRequest,
    Reply,
    Sampling,
    error_body,
)
from llm.tokenizer import EOT_ID


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 1024  # the most a request may ask for, and what it gets when it does not say
    max_body_bytes: int = 1_000_000
    api_key: str | None = None  # a Bearer token every /v1 request must carry


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        if self.status >= 500:
            kind = "server_error"
        return JSONResponse(error_body(str(self), kind, self.param, self.code), status_code=self.status)


Handler = Callable[[Request, dict[str, Any]], Awaitable[Response]]


def build_app(served: ServedModel, tokenizer: tiktoken.Encoding, engine: Engine | None, limits: Limits) -> Starlette:
    """The app serving `served`; `engine` decodes for GPT models (None for a classifier)."""
    classifier_lock = asyncio.Lock()

    def endpoint(name: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """Wrap `handler(request, body)` with the checks every POST /v1 route makes, in order."""

        async def run(request: Request) -> Response:
            try:
                _authenticate(request, limits.api_key)
                body = await _json_body(request, limits.max_body_bytes)
                if name not in ENDPOINTS[served.kind]:
                    routes = " and ".join(f"/v1/{e.replace('.', '/')}" for e in ENDPOINTS[served.kind])
                    message = f"the model {served.name!r} ({served.kind} model) serves only {routes}"
                    raise ApiError(404, message, code="unsupported_endpoint")
                return await handler(request, body)
            except ApiError as err:
                return err.response()
            except ValidationError as err:
                return _validation_error(err).response()

        return run

    def check_model(name: str) -> None:
        if name != served.name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {served.name!r}",
                           param="model", code="model_not_found")  # fmt: skip

    async def chat(request: Request, body: dict[str, Any]) -> Response:
        req = ChatRequest.model_validate(body)
        check_model(req.model)
        try:
            prompt = prompt_ids([Message(m.role, m.text()) for m in req.messages], tokenizer)
        except LLMError as err:
            raise ApiError(400, str(err), param="messages") from err
        if req.max_completion_tokens is not None:
            req = req.model_copy(update={"max_tokens": req.max_completion_tokens})
        return await generate(request, req, prompt, Reply(served.name, chat=True), STOP)

    async def completions(request: Request, body: dict[str, Any]) -> Response:
        req = CompletionRequest.model_validate(body)
        check_model(req.model)
        prompt = tokenizer.encode_ordinary(req.text()) or [EOT_ID]  # '' starts from <|endoftext|>, as llm generate
        return await generate(request, req, prompt, Reply(served.name, chat=False), ())

    async def generate(
        request: Request, req: Sampling, prompt: list[int], reply: Reply, template_stops: tuple[str, ...]
    ) -> Response:
        assert engine is not None
        context = engine.model.config.context_length
        if len(prompt) > context:
            raise ApiError(
                400, f"the prompt has {len(prompt)} tokens; this model's context holds {context}",
                param="messages" if reply.chat else "prompt", code="context_length_exceeded",
            )  # fmt: skip
        if req.max_tokens is not None and req.max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens is at most {limits.max_tokens} on this server", param="max_tokens")
        settings = GenerationConfig(req.max_tokens or limits.max_tokens, req.temperature, req.top_k, req.top_p,
                                    seed=req.seed)  # fmt: skip
        loop, events = asyncio.get_running_loop(), asyncio.Queue[Delta | Done]()
        parts: list[str] = []  # the text of a whole response, appended by the engine thread

        def emit(event: Delta | Done) -> None:  # called from the engine thread; wakes the event loop only when needed
            if isinstance(event, Delta) and not req.stream:
                parts.append(event.text)
            else:
                with contextlib.suppress(RuntimeError):  # the loop has closed: the server is shutting down
                    loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(prompt, settings, emit, tuple(dict.fromkeys(template_stops + req.stops())))
        engine.submit(job)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return EventStream(_sse(reply, events, usage), job)
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request, job))
        try:
            done = await events.get()
            assert isinstance(done, Done)
        finally:
            watcher.cancel()
            job.cancel()
        if done.finish_reason == "error":
            raise ApiError(500, f"generation failed: {done.error}")
        if done.finish_reason == "cancelled":
            raise ApiError(503, "the request was cancelled (the server is shutting down)")
        return JSONResponse(reply.complete("".join(parts), done.finish_reason, done.prompt_tokens,
                                           done.completion_tokens))  # fmt: skip

    async def classifications(request: Request, body: dict[str, Any]) -> Response:
        req = ClassificationRequest.model_validate(body)
        check_model(req.model)
        async with classifier_lock:  # one batch at a time on the CPU, off the event loop
            try:
                results = await run_in_threadpool(classify, served.model, req.texts(), tokenizer)
            except LLMError as err:
                raise ApiError(400, str(err), param="input") from err
        data = [{"index": i, "label": label, "probability": p} for i, (label, p) in enumerate(results)]
        return JSONResponse({"object": "list", "model": served.name, "data": data})

    def model_card() -> dict[str, Any]:
        return {"id": served.name, "object": "model", "created": 0, "owned_by": "llm", "kind": served.kind}

    async def models(request: Request) -> Response:
        try:
            _authenticate(request, limits.api_key)
        except ApiError as err:
            return err.response()
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def health(request: Request) -> Response:
        status = {"status": "ok", "model": served.name, "kind": served.kind}
        if engine is not None:  # requests decoding, waiting for a row, and completion tokens since start
            status |= {"running": len(engine.active), "waiting": len(engine.waiting)}
            status["generated_tokens"] = engine.generated
        return JSONResponse(status)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        return ApiError(exc.status_code, f"{message}: {request.method} {request.url.path}").response()

    async def server_error(request: Request, exc: Exception) -> Response:
        return ApiError(500, "internal server error").response()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", endpoint("chat.completions", chat), methods=["POST"]),
        Route("/v1/completions", endpoint("completions", completions), methods=["POST"]),
        Route("/v1/classifications", endpoint("classifications", classifications), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})


class EventStream(StreamingResponse):
    """Server-sent events whose job is cancelled however the response ends (done, or the client went away)."""

    def __init__(self, content: AsyncIterator[str], job: Job) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


async def _sse(reply: Reply, events: asyncio.Queue[Delta | Done], usage: bool) -> AsyncIterator[str]:
    """OpenAI's chunks as `data: {...}` events, then `data: [DONE]`."""

    def event(data: dict[str, Any]) -> str:
        return f"data: {json.dumps(data)}\n\n"

    if reply.chat:
        yield event(reply.chunk(None))
    while not isinstance(item := await events.get(), Done):
        yield event(reply.chunk(item.text))
    if item.finish_reason in ("error", "cancelled"):
        yield event(error_body(item.error or "the request was cancelled", "server_error"))
    else:
        yield event(reply.chunk(None, item.finish_reason))
        if usage:
            yield event(reply.usage_chunk(item.prompt_tokens, item.completion_tokens))
    yield "data: [DONE]\n\n"


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


def _authenticate(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:  # gone while sending: nobody reads the answer, but the log gets no traceback
        raise ApiError(400, "the client disconnected while sending the body", code="client_disconnected") from None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as err:  # bad JSON or UTF-8, an integer too long, nesting too deep
        raise ApiError(400, f"the body is not valid JSON ({str(err)[:200]})", code="invalid_json") from err
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    return data


_UNION_TAG = re.compile(r"[\w-]+\[|(str|int|float|bool|constrained-str|ContentPart)$")  # pydantic's union members


def _validation_error(err: ValidationError) -> ApiError:
    """The first problem pydantic found, as an OpenAI error naming the parameter."""
    first = err.errors()[0]
    param = ".".join(str(part) for part in first["loc"] if not _UNION_TAG.match(str(part)))
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"unrecognized request argument supplied: {param}", param=param)
    if first["type"] == "missing":
        return ApiError(400, f"missing required parameter: {param}", param=param)
    return ApiError(400, f"invalid value for {param or 'the body'}: {first['msg']}", param=param or None)
