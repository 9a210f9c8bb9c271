"""`afm-mlx serve`: an OpenAI-compatible HTTP server, a thin front end over the batch engine (afm_mlx.engine).

    GET  /v1/models              the base (`afm`) and each adapter (`afm:NAME`) as model ids
    POST /v1/chat/completions    messages -> a reply; stream (SSE), n, logprobs, usage; tools / tool_choice and
                                 response_format through guided generation (afm_mlx.guided)
    POST /v1/completions         raw prompt(s) -> text
    GET  /health, GET /metrics   liveness; Prometheus text (requests, tokens/s, queue depth, batch size)

Every request becomes one BatchRequest per choice; the engine thread decodes all of them in one batch and hands
the pieces back through `loop.call_soon_threadsafe`. Errors use OpenAI's JSON shape (`{"error": {...}}`): 400 for
an invalid request, 401 for a bad key, 413 for a body over the cap, 429 when the queue is full, 503 while
shutting down; never a traceback. A client that disconnects has its rows cancelled at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Literal

import mlx.core as mx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .adapters import list_adapters
from .batch import BatchRequest, BatchResponse, TokenLogprob
from .engine import Engine, EngineStopped, QueueFull, Ticket
from .errors import AFMError
from .generation import GuidedOutput, prompt_ids
from .guided import Guide, make_guide
from .sampling import SamplingParams
from .tokenizer import EXECUTABLE_START

BASE_MODEL_ID = "afm"


@dataclass
class ServerConfig:
    api_key: str | None = None
    max_tokens_cap: int = 4096  # the most tokens one choice may ask for
    default_max_tokens: int = 512
    max_context: int = 4096
    max_body_bytes: int = 1 << 20
    max_n: int = 8
    num_draft_tokens: int = 0  # k for requests that do not say (0: plain decoding)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


# ---- request bodies (unknown fields are ignored, as OpenAI's own clients send optional extras)


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    num_draft_tokens: int | None = Field(None, ge=0, le=32)  # afm-mlx's own: k of speculative rounds (0: none)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls, rendered as the toolkit does


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


# ---- from a body to engine requests


def chat_guide(tokenizer, body: ChatRequest) -> Guide | None:
    """The guided-generation constraint of a chat request (tools / tool_choice / response_format), or None; 400
    naming the problem for an invalid or unsupported schema or tool. `json_object` is any JSON object."""
    options: dict[str, Any] = {}
    kind = body.response_format.get("type", "text") if body.response_format is not None else "text"
    if kind == "json_object":
        options["schema"] = {"type": "object"}
    elif kind != "text":
        options["response_format"] = body.response_format
    if body.tools:
        options.update(tools=body.tools, tool_choice=body.tool_choice, parallel_tool_calls=body.parallel_tool_calls)
    elif body.tool_choice not in (None, "none"):
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    try:
        return make_guide(tokenizer, **options)
    except AFMError as err:
        param = "tools" if body.tools else "response_format"
        raise APIError(400, str(err), param=param) from None


def check_unsupported(body: Sampling) -> None:
    for name, value, default in (("presence_penalty", body.presence_penalty, 0.0),
                                 ("frequency_penalty", body.frequency_penalty, 0.0),
                                 ("logit_bias", body.logit_bias, None)):
        if value not in (default, {}):
            raise APIError(400, f"'{name}' is not supported (use repetition_penalty)", param=name,
                           code="unsupported_parameter")


def adapter_for(model_id: str, model) -> str | None:
    """`afm` -> None (the base), `afm:NAME` -> adapter NAME; 400 for anything else."""
    if model_id == BASE_MODEL_ID:
        return None
    prefix, _, name = model_id.partition(":")
    if prefix == BASE_MODEL_ID and name in list_adapters(model):
        return name
    raise APIError(400, f"the model {model_id!r} does not exist (available: {', '.join(model_ids(model))})",
                   param="model", code="model_not_found")


def model_ids(model) -> list[str]:
    return [BASE_MODEL_ID] + [f"{BASE_MODEL_ID}:{name}" for name in list_adapters(model)]


def engine_requests(body: Sampling, ids: list[int], adapter: str | None, max_tokens: int | None,
                    top_logprobs: int | None, config: ServerConfig, guide: Guide | None = None) -> list[BatchRequest]:
    """n requests for one prompt (choice i samples with seed + i, so choices differ but replay)."""
    max_tokens = config.default_max_tokens if max_tokens is None else max_tokens
    if max_tokens > config.max_tokens_cap:
        raise APIError(400, f"max_tokens is {max_tokens}, over this server's cap of {config.max_tokens_cap}",
                       param="max_tokens")
    if body.n > config.max_n:
        raise APIError(400, f"n is {body.n}, over this server's cap of {config.max_n}", param="n")
    k = config.num_draft_tokens if body.num_draft_tokens is None else body.num_draft_tokens
    requests = []
    for i in range(body.n):
        params = _params(body, None if body.seed is None else (body.seed + i) % 2**63)
        requests.append(BatchRequest(ids, params, max_tokens, body.stop, adapter, config.max_context,
                                     top_logprobs, guide, num_draft_tokens=k))
    return requests


def _params(body: Sampling, seed: int | None) -> SamplingParams:
    try:
        return SamplingParams(body.temperature, body.top_k, body.top_p, body.min_p, body.repetition_penalty,
                              seed=seed)
    except AFMError as err:
        raise APIError(400, str(err)) from None


def chat_ids(tokenizer, messages: list[Message], guide: Guide | None = None) -> list[int]:
    """The prompt ids of a conversation, with a guide's tools and response format rendered as the toolkit does."""
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content),
              **({"tool_calls": m.tool_calls} if m.tool_calls else {})} for m in messages]
    try:
        return prompt_ids(tokenizer, turns, guide=guide)
    except AFMError as err:
        raise APIError(400, str(err), param="messages") from None


def _text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if any(part.get("type") != "text" for part in content):
        raise APIError(400, "only text content parts are supported", param="messages")
    return "".join(str(part.get("text", "")) for part in content)


def completion_prompts(tokenizer, prompt) -> list[list[int]]:
    """Token ids of each prompt: strings are encoded raw (no chat template), lists of ints taken as ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    try:
        return [tokenizer.encode_prompt(p, raw=True) if isinstance(p, str) else list(p) for p in prompt]
    except AFMError as err:
        raise APIError(400, str(err), param="prompt") from None


# ---- running requests on the engine


class Choices:
    """The engine requests of one HTTP request: submits them, yields (choice index, piece) as they come, and
    cancels whatever is still running when the consumer stops (a client that went away)."""

    def __init__(self, engine: Engine, requests: list[BatchRequest]):
        self.engine, self.requests = engine, requests
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tickets: list[Ticket] = []
        self.open = len(requests)

    def submit(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for i, request in enumerate(self.requests):
                sink = lambda item, i=i: loop.call_soon_threadsafe(self.queue.put_nowait, (i, item))  # noqa: E731
                self.tickets.append(self.engine.submit(request, sink))
        except QueueFull as err:
            self.cancel()
            raise APIError(429, str(err), "rate_limit_error", code="queue_full") from None
        except EngineStopped as err:
            self.cancel()
            raise APIError(503, str(err), "server_error", code="shutting_down") from None
        except AFMError as err:
            self.cancel()
            raise APIError(400, str(err)) from None

    async def pieces(self) -> AsyncIterator[tuple[int, BatchResponse]]:
        try:
            while self.open:
                i, item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise APIError(500, str(item), "server_error")
                if item.finish_reason is not None:
                    self.open -= 1
                yield i, item
        finally:
            self.cancel()

    def cancel(self) -> None:
        for ticket in self.tickets:
            if not ticket.done:
                self.engine.cancel(ticket)


async def watch_disconnect(request: Request, choices: Choices) -> None:
    """For non-streaming responses: cancel the rows as soon as the client is gone."""
    while choices.open:
        if await request.is_disconnected():
            choices.cancel()
            return
        await asyncio.sleep(0.25)


# ---- responses


@dataclass
class Output:
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    guided: GuidedOutput | None = None


def finish_reason(reason: str | None) -> str | None:
    return {"context": "length", "cancelled": "stop"}.get(reason, reason)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_text(tokenizer, token: int) -> str:
    return tokenizer.id_to_piece(token).replace("\u2581", " ")


def chat_logprobs(tokenizer, logprobs: list[TokenLogprob]) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [dict(entry(lp.token, lp.logprob), top_logprobs=[entry(t, v) for t, v in lp.top])
                        for lp in logprobs]}


def completion_logprobs(tokenizer, logprobs: list[TokenLogprob], offset: int = 0) -> dict:
    tokens = [token_text(tokenizer, lp.token) for lp in logprobs]
    offsets = [offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{token_text(tokenizer, t): v for t, v in lp.top} for lp in logprobs],
            "text_offset": offsets}


async def collect(choices: Choices, request: Request) -> list[Output]:
    outputs = [Output(logprobs=[]) for _ in choices.requests]
    watcher = asyncio.create_task(watch_disconnect(request, choices))
    try:
        async for i, piece in choices.pieces():
            out = outputs[i]
            out.text += piece.text
            out.tokens += len(piece.tokens)
            out.logprobs += piece.logprobs
            out.finish_reason = finish_reason(piece.finish_reason) or out.finish_reason
            out.guided = piece.guided or out.guided
    finally:
        watcher.cancel()
    return outputs


async def guarded(stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream whose status is already sent ends with an error event in OpenAI's shape, not a broken connection."""
    try:
        async for event in stream:
            yield event
    except APIError as err:
        yield sse({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}})


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


# ---- the app


def create_app(engine: Engine, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    app = FastAPI(title="afm-mlx", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.config, app.state.started = engine, config, time.time()
    install_error_handlers(app)
    install_limits(app, config)
    add_info_routes(app)
    add_chat_route(app)
    add_completion_route(app)
    return app


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return APIError(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, err: StarletteHTTPException):
        return APIError(err.status_code, str(err.detail), "invalid_request_error").response()

    @app.exception_handler(Exception)
    async def internal(_, err: Exception):
        return APIError(500, "internal server error", "server_error").response()


def install_limits(app: FastAPI, config: ServerConfig) -> None:
    app.add_middleware(Limits, config=config)


class Limits:
    """The API key on /v1 (Bearer, constant-time compare) and the body cap (by Content-Length), as plain ASGI
    middleware: Starlette's BaseHTTPMiddleware (`@app.middleware`) passes every streamed chunk through an anyio
    memory stream and extra tasks, Python work on the event loop thread that holds the GIL the engine thread needs."""

    def __init__(self, app, config: ServerConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send) -> None:
        refusal = self.refusal(scope) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await refusal.response()(scope, receive, send)

    def refusal(self, scope) -> APIError | None:
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        if scope["path"].startswith("/v1/") and self.config.api_key is not None:
            scheme, _, key = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.encode(), self.config.api_key.encode()):
                return APIError(401, "invalid or missing API key", code="invalid_api_key")
        if scope["method"] == "POST":
            length = headers.get("content-length")
            if length is None or not length.isdigit():
                return APIError(411, "a Content-Length header is required")
            if int(length) > self.config.max_body_bytes:
                return APIError(413, f"the request body is over {self.config.max_body_bytes} bytes")
        return None


def add_info_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        engine: Engine = app.state.engine
        created = int(app.state.started)
        return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": "afm-mlx"}
                                           for m in model_ids(engine.model)]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(app.state.engine), media_type="text/plain; version=0.0.4")


def prometheus_text(engine: Engine) -> str:
    m, now = engine.metrics, time.monotonic()
    lines = ["# HELP afm_requests_total Requests by outcome.", "# TYPE afm_requests_total counter"]
    lines += [f'afm_requests_total{{outcome="{k}"}} {v}' for k, v in m.requests.items()]
    for name, kind, value, about in (
            ("afm_prompt_tokens_total", "counter", m.prompt_tokens, "Prompt tokens of admitted requests."),
            ("afm_generated_tokens_total", "counter", m.generated_tokens, "Tokens generated."),
            ("afm_tokens_per_second", "gauge", round(m.tokens_per_second(now), 3),
             f"Generated tokens per second over the last {m.WINDOW_S:g} s."),
            ("afm_queue_depth", "gauge", engine.queue_depth, "Requests waiting for a batch row."),
            ("afm_batch_size", "gauge", m.batch_size, "Rows in the last decode step."),
            ("afm_decode_steps_total", "counter", m.steps, "Batched decode steps."),
            ("afm_draft_tokens_proposed_total", "counter", m.draft_proposed,
             "Draft tokens proposed to finished speculative requests."),
            ("afm_draft_tokens_accepted_total", "counter", m.draft_accepted, "Of those, accepted by the base."),
            ("afm_speculative_acceptance", "gauge", round(m.draft_accepted / max(m.draft_proposed, 1), 4),
             "Accepted / proposed draft tokens so far."),
            ("afm_prefix_cache_bytes", "gauge", engine.prefix_cache_bytes, "K/V bytes held for shared prefixes."),
            ("afm_active_memory_bytes", "gauge", mx.get_active_memory(), "MLX memory in use (weights included).")):
        lines += [f"# HELP {name} {about}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"


def add_chat_route(app: FastAPI) -> None:
    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        engine: Engine = app.state.engine
        check_unsupported(body)
        adapter = adapter_for(body.model, engine.model)
        guide = chat_guide(engine.tokenizer, body)
        ids = chat_ids(engine.tokenizer, body.messages, guide)
        top = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens
        choices = Choices(engine, engine_requests(body, ids, adapter, max_tokens, top, app.state.config, guide))
        choices.submit()
        meta = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": body.model}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(guarded(chat_stream(choices, meta, len(ids), include_usage, engine.tokenizer)),
                                     media_type="text/event-stream")
        outputs = await collect(choices, request)
        return chat_response(outputs, meta, len(ids), engine.tokenizer, body.logprobs)


def chat_response(outputs: list[Output], meta: dict, prompt_tokens: int, tokenizer, logprobs: bool) -> dict:
    choices = [{"index": i, "message": {"role": "assistant", "content": out.text, **tool_call_fields(out.guided)},
                "logprobs": chat_logprobs(tokenizer, out.logprobs) if logprobs else None,
                "finish_reason": "tool_calls" if _called(out.guided) else out.finish_reason}
               for i, out in enumerate(outputs)]
    return dict(meta, object="chat.completion", choices=choices,
                usage=usage(prompt_tokens, sum(o.tokens for o in outputs)))


def _called(guided: GuidedOutput | None) -> bool:
    return guided is not None and bool(guided.tool_calls)


def tool_call_fields(guided: GuidedOutput | None, stream: bool = False) -> dict:
    """A reply's tool calls in OpenAI's shape (arguments as a JSON string); its content is the text before them."""
    if not _called(guided):
        return {}
    calls = [{"id": f"call_{secrets.token_hex(8)}", "type": "function",
              "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
             for c in guided.tool_calls]
    if stream:
        return {"tool_calls": [dict(call, index=n) for n, call in enumerate(calls)]}
    return {"content": guided.content or None, "tool_calls": calls}


async def chat_stream(choices: Choices, meta: dict, prompt_tokens: int, include_usage: bool,
                      tokenizer) -> AsyncIterator[str]:
    """Content deltas as they come; a tool-call block is not streamed as text: its calls follow as one
    `tool_calls` delta when the reply ends (finish_reason "tool_calls")."""
    chunk = dict(meta, object="chat.completion.chunk")
    for i in range(len(choices.requests)):
        yield sse(dict(chunk, choices=[{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]))
    completion_tokens = 0
    in_block: set[int] = set()
    with_tools = {i for i, r in enumerate(choices.requests) if r.guide is not None and r.guide.kind == "tools"}
    async for i, piece in choices.pieces():
        completion_tokens += len(piece.tokens)
        text = _before_block(piece.text, i, in_block) if i in with_tools else piece.text
        if not text and piece.finish_reason is None and not piece.logprobs:
            continue
        logprobs = chat_logprobs(tokenizer, piece.logprobs) if piece.logprobs else None
        delta = ({"content": text} if text else {}) | tool_call_fields(piece.guided, stream=True)
        reason = "tool_calls" if _called(piece.guided) else finish_reason(piece.finish_reason)
        yield sse(dict(chunk, choices=[{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]))
    if include_usage:
        yield sse(dict(chunk, choices=[], usage=usage(prompt_tokens, completion_tokens)))
    yield sse("[DONE]")


def _before_block(text: str, choice: int, in_block: set[int]) -> str:
    """The part of a streamed piece that is content: nothing once a choice's tool-call block has begun."""
    if choice in in_block:
        return ""
    at = text.find(EXECUTABLE_START)
    if at < 0:
        return text
    in_block.add(choice)
    return text[:at]


def add_completion_route(app: FastAPI) -> None:
    @app.post("/v1/completions")
    async def complete(body: CompletionRequest, request: Request):
        engine: Engine = app.state.engine
        check_unsupported(body)
        if body.echo or body.suffix is not None or (body.best_of or 1) > 1:
            raise APIError(400, "echo, suffix and best_of are not supported", code="unsupported_parameter")
        adapter = adapter_for(body.model, engine.model)
        prompts = completion_prompts(engine.tokenizer, body.prompt)
        requests = [r for ids in prompts
                    for r in engine_requests(body, ids, adapter, body.max_tokens, body.logprobs, app.state.config)]
        choices = Choices(engine, requests)
        choices.submit()
        meta = {"id": f"cmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": body.model}
        prompt_tokens = sum(len(ids) for ids in prompts)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(guarded(completion_stream(choices, meta, prompt_tokens, include_usage,
                                                               engine.tokenizer, body.logprobs is not None)),
                                     media_type="text/event-stream")
        outputs = await collect(choices, request)
        return completion_response(outputs, meta, prompt_tokens, engine.tokenizer, body.logprobs is not None)


def completion_response(outputs: list[Output], meta: dict, prompt_tokens: int, tokenizer, logprobs: bool) -> dict:
    choices = [{"index": i, "text": out.text, "finish_reason": out.finish_reason,
                "logprobs": completion_logprobs(tokenizer, out.logprobs) if logprobs else None}
               for i, out in enumerate(outputs)]
    return dict(meta, object="text_completion", choices=choices,
                usage=usage(prompt_tokens, sum(o.tokens for o in outputs)))


async def completion_stream(choices: Choices, meta: dict, prompt_tokens: int, include_usage: bool, tokenizer,
                            logprobs: bool) -> AsyncIterator[str]:
    chunk = dict(meta, object="text_completion")
    completion_tokens = 0
    async for i, piece in choices.pieces():
        completion_tokens += len(piece.tokens)
        if not piece.text and piece.finish_reason is None and not piece.logprobs:
            continue
        lp = completion_logprobs(tokenizer, piece.logprobs) if logprobs and piece.logprobs else None
        yield sse(dict(chunk, choices=[{"index": i, "text": piece.text, "logprobs": lp,
                                        "finish_reason": finish_reason(piece.finish_reason)}]))
    if include_usage:
        yield sse(dict(chunk, choices=[], usage=usage(prompt_tokens, completion_tokens)))
    yield sse("[DONE]")


# ---- afm-mlx serve


def serve(*, model_dir=None, adapters=(), host: str = "127.0.0.1", port: int = 8080, max_batch: int = 32,
          max_queue: int = 64, prefix_cache_mb: int = 256, shutdown_timeout: float = 10.0,
          config: ServerConfig | None = None) -> None:
    """Load the model (the demo family by default) and its adapters, serve until SIGTERM / Ctrl-C, then stop
    taking requests, let running ones finish for up to shutdown_timeout seconds, cancel the rest and return."""
    import signal

    import uvicorn

    from .adapters import set_active_adapter
    from .frontend import load_for_generation

    config = config or ServerConfig()
    _check_serve_options(port, max_queue, prefix_cache_mb, shutdown_timeout, config)
    model, tokenizer = load_for_generation(model_dir, None, False, adapters)
    if config.num_draft_tokens and getattr(model, "draft", None) is None:
        raise AFMError("--num-draft-tokens needs a draft model: MODEL/draft is missing")
    set_active_adapter(model, None)  # each request names its adapter
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue,
                    prefix_cache_bytes=prefix_cache_mb << 20, draft=getattr(model, "draft", None)).start()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, config), host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=max(int(shutdown_timeout), 1)))
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn re-raises the signal it caught once it has shut down
        signal.signal(sig, lambda *_: None)
    print(f"afm-mlx serving {', '.join(model_ids(model))} on http://{host}:{port}", flush=True)
    try:
        server.run()
    finally:
        engine.stop(timeout=1.0)
    if not server.started:
        raise AFMError(f"could not start the server on {host}:{port} (is the port in use?)")


def _check_serve_options(port: int, max_queue: int, prefix_cache_mb: int, shutdown_timeout: float,
                         config: ServerConfig) -> None:
    checks = [(0 <= port < 65536, f"--port must be in [0, 65535], got {port}"),
              (max_queue >= 1, f"--max-queue must be >= 1, got {max_queue}"),
              (prefix_cache_mb >= 0, f"--prefix-cache-mb must be >= 0, got {prefix_cache_mb}"),
              (shutdown_timeout > 0, f"--shutdown-timeout must be > 0, got {shutdown_timeout}"),
              (config.max_tokens_cap >= 1, f"--max-tokens must be >= 1, got {config.max_tokens_cap}"),
              (config.max_context >= 2, f"--max-context must be >= 2, got {config.max_context}"),
              (0 <= config.num_draft_tokens <= 32, f"--num-draft-tokens must be in [0, 32], got "
                                                   f"{config.num_draft_tokens}"),
              (config.api_key is None or config.api_key.strip() != "", "--api-key must not be empty")]
    for ok, message in checks:
        if not ok:
            raise AFMError(message)
