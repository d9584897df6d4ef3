"""An HTTP completions server shaped like OpenAI's `/v1/completions`, with request batching.

    POST /v1/completions   {"prompt": "def ", "max_tokens": 32, "temperature": 0.8, "stream": true}
    GET  /health           status, model name, context length, int8, queue depth, batches run
    GET  /v1/models        the one model served, in OpenAI's list shape
    GET  /metrics          Prometheus text: requests by status, latency, tokens, batch sizes, queue depth

Why it is built this way:

- **Batching.** Requests land in an asyncio queue. One batcher task takes the
  first waiting request, keeps collecting for `batch_window_ms` (or until
  `max_batch_size` prompts), and runs them as one left-padded `generate` call in
  a worker thread, so the event loop keeps accepting requests and streaming
  tokens meanwhile. Prompts batch together only when they share temperature
  and top_p and fit the context side by side; each row samples from its own
  random generator (seeded by its request's `seed`), so differently seeded
  requests share a batch and a seeded answer is the same alone or batched.
- **A client that leaves costs nothing more.** A non-streaming handler waits
  for its answer or for the client's disconnect, whichever comes first; a
  streaming response is cancelled by the disconnect. Either way its rows are
  marked cancelled: dropped from the queue if still waiting, and a running batch
  ends at the next token once none of its rows has a client left.
- **Slow clients are cut off.** Request headers must arrive within
  `header_timeout_s` and the body within `body_timeout_s` (408, then the
  connection closes); idle keep-alive connections close after
  `keep_alive_timeout_s`.
- **Validation first.** The body size is checked before it is read in full
  (413), then JSON (400; nesting too deep, over-long integers and NaN included),
  then the fields (400, naming the field, strict types: `"5"` or `true` is not
  an integer, unknown fields rejected), then the token limits (400). Every
  error, an unexpected 500 included, uses OpenAI's
  `{"error": {"message", "type", "param", "code"}}` shape so client libraries
  show the message.
- **Optional bearer-token auth** (`ServerConfig.api_key`): every endpoint but
  `/health` then needs `Authorization: Bearer <key>` (401 otherwise).
- **Streaming** is server-sent events (`data: {chunk}` ... `data: [DONE]`). Text
  is released only once it can no longer turn out to be the start of a stop
  sequence, and never in the middle of a multi-byte character.

`run(...)` loads a checkpoint, an MLflow model URI or a run root's trained model
(optionally with LoRA adapters and int8 weights; see `refinery.serving.loading`)
and serves it with uvicorn; the key comes from `api_key_file` or `$REFINERY_API_KEY`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import os
import random
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from tokenizers import Tokenizer
from uvicorn.protocols.http.h11_impl import H11Protocol

from refinery.model.generate import generate
from refinery.model.quantize import is_quantized
from refinery.serving.loading import load_for_serving

EOT = "<|endoftext|>"
API_KEY_ENV = "REFINERY_API_KEY"
GREEDY_BELOW = 1e-4  # temperatures under this decode greedily: dividing logits by them overflows to inf
MAX_SEED = 2**63 - 1


class ServerConfig(BaseModel):
    """Limits and batching of the completions server."""

    model_config = ConfigDict(extra="forbid")

    model_name: str = Field(default="refinery", min_length=1, description="the `model` field of every answer")
    max_tokens_limit: int = Field(default=256, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(default=16, ge=1, description="max_tokens when a request gives none")
    max_prompt_tokens: int | None = Field(
        default=None, ge=1, description="longest prompt in tokens; None: the model's context minus one"
    )
    max_prompt_chars: int = Field(default=65_536, ge=1, description="longest prompt in characters")
    max_body_bytes: int = Field(default=262_144, ge=1024, description="largest request body (413 beyond)")
    max_prompts_per_request: int = Field(default=8, ge=1, description="longest list of prompts in one request")
    max_batch_size: int = Field(default=8, ge=1, description="prompts decoded together in one batch")
    batch_window_ms: float = Field(
        default=5.0, ge=0, le=1000, description="how long the batcher waits for more requests after the first"
    )
    max_pending: int = Field(default=256, ge=1, description="prompts waiting or running before 429 answers")
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="a connection must send a request's complete headers within this"
    )
    body_timeout_s: float = Field(default=30.0, gt=0, description="the whole request body must arrive within this")
    keep_alive_timeout_s: float = Field(default=5.0, gt=0, description="idle keep-alive connections close after this")
    max_header_bytes: int = Field(default=16_384, ge=1024, description="largest request head (h11's limit)")
    api_key: str | None = Field(
        default=None, min_length=1, repr=False, description="bearer token every endpoint but /health needs; None: open"
    )


class CompletionRequest(BaseModel):
    """The subset of OpenAI's completions request this server honours; anything else is an error."""

    # strict: a JSON string or boolean is never taken for a number (ints are still fine for floats)
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str | list[str] = Field(default="", description="text to continue, or a list of texts")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(
        default=1.0, ge=0.0, le=2.0, description=f"0 is greedy; so is anything below {GREEDY_BELOW}"
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(default=None, validate_default=True, description="up to 4 stop strings")
    stream: bool = False
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    user: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_list(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must be a string or a non-empty list of strings")
        _no_surrogates(value)
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be up to 4 non-empty strings")
        _no_surrogates(stops)
        return stops

    @field_validator("model", "user")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        _no_surrogates(value)
        return value

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


def _no_surrogates(value: str | list[str] | None) -> None:
    """JSON's `\\ud800` escapes decode to lone surrogates, which no tokenizer (or UTF-8 encoder) accepts."""
    for text in [value] if isinstance(value, str) else value or []:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode (it contains a lone surrogate)") from None


class RequestError(Exception):
    """A client error, answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


class _ClientGone(Exception):
    """The client disconnected before its answer was ready; nothing is sent."""


class _AsciiJSON(JSONResponse):
    """JSON with non-ASCII escaped: an error message may quote client text that is not valid UTF-8."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    kind = "invalid_request_error" if status < 500 else "server_error"
    return _AsciiJSON(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status,
        headers=headers,
    )


# ----------------------------------------------------------------------------- one prompt in flight


class _AllDone(Exception):
    """Raised from the token callback to end a batch early once every row is finished."""


@dataclass
class _Row:
    """One prompt of one request: its tokens, its limits, and where its text goes."""

    index: int
    ids: list[int]
    max_tokens: int
    stop: list[str]
    sampling: tuple[float, float]  # (temperature, top_p): rows batch only with equals
    seed: int | None  # this row's own random stream; None: a fresh random one
    tokenizer: Tokenizer
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue | None  # streaming: (index, text delta, finish_reason | None)
    done: asyncio.Future
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None
    cancelled: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    # The methods below run in the generation thread.
    def add(self, token: int) -> None:
        if self.finished:
            return
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.text = text[: min(cuts)]
            self._finish("stop")
        elif len(self.tokens) >= self.max_tokens:
            self.text = text
            self._finish("length")
        elif not text.endswith("\ufffd"):  # wait for a multi-byte character to complete
            self.text = text
            self._release(len(text) - _held_back(text, self.stop))

    def end(self, error: BaseException | None = None) -> None:
        """The batch is over: a row that did not finish stopped at end-of-text."""
        if error is not None:
            self.loop.call_soon_threadsafe(_set_exception, self.done, error)
            if self.events is not None:
                self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, error, "error"))
            return
        if not self.finished:
            self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            self._finish("stop")

    def _release(self, upto: int) -> None:
        if self.events is not None and upto > self.emitted:
            delta, self.emitted = self.text[self.emitted : upto], upto
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, delta, None))

    def _finish(self, reason: str) -> None:
        self._release(len(self.text))
        self.finish_reason = reason
        if self.events is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, "", reason))
        self.loop.call_soon_threadsafe(_set_result, self.done, reason)


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop sequence."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


# ----------------------------------------------------------------------------- metrics


class _Metrics:
    """Prometheus metrics in a registry of their own, so several apps in one process never clash."""

    ENDPOINTS = ("/v1/completions", "/v1/models", "/health", "/metrics")

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("refinery_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)  # fmt: skip
        self.latency = Histogram("refinery_request_latency_seconds",
                                 "time from a completions request to the end of its answer (streams included)",
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)  # fmt: skip
        self.tokens = Counter("refinery_generated_tokens", "completion tokens generated", registry=r)
        self.batch_size = Histogram("refinery_batch_size", "prompts decoded together per batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)  # fmt: skip
        self.queue_depth = Gauge("refinery_queue_depth", "prompts waiting or being decoded", registry=r)
        self.cancelled = Counter("refinery_cancelled_prompts",
                                 "prompts dropped or stopped early because their client disconnected", registry=r)  # fmt: skip


class _Observe:
    """ASGI middleware counting every answer by status and timing completions (plain ASGI, so it
    leaves the receive channel alone and disconnects still reach the handlers)."""

    def __init__(self, app: Any, metrics: _Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_observed(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            path = scope["path"]
            endpoint = path if path in _Metrics.ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            if endpoint == "/v1/completions":
                self.metrics.latency.observe(time.perf_counter() - start)


# ----------------------------------------------------------------------------- the batcher


class Batcher:
    """Collects rows for a few milliseconds and decodes them together, one batch at a time."""

    def __init__(self, model: torch.nn.Module, eot_id: int, cfg: ServerConfig, metrics: _Metrics | None = None) -> None:
        self.model, self.eot_id, self.cfg = model, eot_id, cfg
        self.metrics = metrics or _Metrics()
        self.context = int(model.cfg.seq_len)
        self.device = next(model.parameters()).device
        self.queue: asyncio.Queue[_Row] = asyncio.Queue()
        self.pending = 0
        self.batches = 0
        self.largest_batch = 0
        self.cancelled = 0
        self._task: asyncio.Task | None = None
        self.metrics.queue_depth.set_function(lambda: self.pending)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def submit(self, rows: list[_Row]) -> None:
        if self.pending + len(rows) > self.cfg.max_pending:
            raise RequestError(429, f"the server has {self.pending} prompts in flight; retry shortly")
        self.pending += len(rows)
        for row in rows:
            self.queue.put_nowait(row)

    def _count_cancelled(self, n: int) -> None:
        self.cancelled += n
        self.metrics.cancelled.inc(n)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            rows = [await self.queue.get()]
            deadline = loop.time() + self.cfg.batch_window_ms / 1000
            while len(rows) < self.cfg.max_batch_size * 4:
                timeout = deadline - loop.time()
                try:
                    rows.append(self.queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self.queue.get(), timeout))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
            for batch in self._plan(rows):
                live = [r for r in batch if not r.cancelled]  # clients may leave while earlier batches run
                self.pending -= len(batch) - len(live)
                self._count_cancelled(len(batch) - len(live))
                if live:
                    try:
                        await asyncio.to_thread(self._run, live)
                    finally:
                        self.pending -= len(live)

    def _plan(self, rows: list[_Row]) -> list[list[_Row]]:
        """Split rows into batches of equal sampling settings that fit the context and the batch size."""
        batches: list[list[_Row]] = []
        open_: dict[tuple, list[_Row]] = {}
        for row in rows:
            batch = open_.get(row.sampling)
            if batch is not None:
                longest = max(len(r.ids) for r in batch + [row])
                most = max(r.max_tokens for r in batch + [row])
                if len(batch) < self.cfg.max_batch_size and longest + most <= self.context:
                    batch.append(row)
                    continue
            open_[row.sampling] = [row]
            batches.append(open_[row.sampling])
        return batches

    def _run(self, rows: list[_Row]) -> None:
        """Decode one batch (in a worker thread); every row's future is settled on return."""
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(rows))
        self.metrics.batch_size.observe(len(rows))
        temperature, top_p = rows[0].sampling

        def on_token(i: int, token: int) -> None:
            rows[i].add(token)
            if all(r.finished for r in rows):  # finished, or its client is gone: stop decoding the batch
                raise _AllDone

        generators = None
        if temperature > 0:
            generators = [torch.Generator(device=self.device).manual_seed(
                r.seed if r.seed is not None else random.randrange(MAX_SEED)) for r in rows]  # fmt: skip
        error: BaseException | None = None
        try:
            generate(
                self.model,
                [r.ids for r in rows],
                max_new_tokens=max(r.max_tokens for r in rows),
                temperature=temperature,
                top_p=top_p if top_p < 1.0 else None,
                eos_id=self.eot_id,
                generators=generators,
                on_token=on_token,
            )
        except _AllDone:
            pass
        except Exception as exc:  # noqa: BLE001 - handed to the waiting requests as a 500
            error = exc
        self.metrics.tokens.inc(sum(len(r.tokens) for r in rows))
        self._count_cancelled(sum(r.cancelled and r.finish_reason is None for r in rows))
        for row in rows:
            row.end(error)


# ----------------------------------------------------------------------------- the app


def create_app(model: torch.nn.Module, tokenizer: Tokenizer, cfg: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving `model` (a `refinery.model.gpt.GPT`, float or int8) with `tokenizer`."""
    cfg = cfg or ServerConfig()
    eot_id = tokenizer.token_to_id(EOT)
    if eot_id is None:
        raise ValueError(f"the tokenizer has no {EOT!r} token; use the tokenizer the model was trained with")
    model.eval()
    context = int(model.cfg.seq_len)
    max_prompt_tokens = min(cfg.max_prompt_tokens or context - 1, context - 1)
    metrics = _Metrics()
    batcher = Batcher(model, eot_id, cfg, metrics)
    key = cfg.api_key.encode() if cfg.api_key else None

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="Refinery completions",
        description="OpenAI-style text completions from a Refinery model, with request batching.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.config = cfg
    app.state.metrics = metrics
    app.add_middleware(_Observe, metrics=metrics)

    def authorize(request: Request) -> None:
        """401 unless the bearer token matches (compared in constant time); a no-op without a key."""
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1"), key):
            raise RequestError(401, "missing or incorrect API key; send 'Authorization: Bearer <key>'", None,
                               "invalid_api_key", {"WWW-Authenticate": "Bearer"})  # fmt: skip

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(_ClientGone)
    async def _client_gone(_: Request, __: _ClientGone) -> Response:
        return Response(status_code=499)  # never reaches the client; counted in the metrics as "client closed"

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, f"invalid request: {exc.errors()}")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal server error ({type(exc).__name__})")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": cfg.model_name,
            "context": context,
            "int8": is_quantized(model),
            "pending": batcher.pending,
            "batches": batcher.batches,
            "largest_batch": batcher.largest_batch,
            "cancelled": batcher.cancelled,
        }

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        authorize(request)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "owned_by": "refinery"}]}

    @app.post(
        "/v1/completions",
        openapi_extra={
            "requestBody": {"content": {"application/json": {"schema": CompletionRequest.model_json_schema()}}}
        },
    )
    async def completions(request: Request) -> Any:
        authorize(request)
        req = _parse(await _read_body(request, cfg.max_body_bytes, cfg.body_timeout_s))
        if req.model is not None and req.model != cfg.model_name:
            raise RequestError(404, f"model {req.model!r} is not served here; this server serves {cfg.model_name!r}",
                               "model", "model_not_found")  # fmt: skip
        max_tokens = req.max_tokens or min(cfg.default_max_tokens, cfg.max_tokens_limit)
        if max_tokens > cfg.max_tokens_limit:
            raise RequestError(400, f"max_tokens must be at most {cfg.max_tokens_limit}, got {max_tokens}", "max_tokens")
        prompts = req.prompts()
        if len(prompts) > cfg.max_prompts_per_request:
            raise RequestError(400, f"at most {cfg.max_prompts_per_request} prompts per request, got {len(prompts)}",
                               "prompt")  # fmt: skip
        # Greedy rows batch together whatever their top_p; tiny temperatures are greedy (see GREEDY_BELOW).
        sampling = (0.0, 1.0) if req.temperature < GREEDY_BELOW else (req.temperature, req.top_p)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue | None = asyncio.Queue() if req.stream else None
        rows = []
        for i, text in enumerate(prompts):
            if len(text) > cfg.max_prompt_chars:
                raise RequestError(400, f"prompt is {len(text)} characters; the limit is {cfg.max_prompt_chars}", "prompt")
            ids = tokenizer.encode(text).ids or [eot_id]
            if len(ids) > max_prompt_tokens:
                raise RequestError(400, f"prompt is {len(ids)} tokens; the limit is {max_prompt_tokens}", "prompt",
                                   "context_length_exceeded")  # fmt: skip
            if len(ids) + max_tokens > context:
                raise RequestError(
                    400,
                    f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's context of {context}; "
                    "shorten the prompt or lower max_tokens",
                    "max_tokens",
                    "context_length_exceeded",
                )
            rows.append(_Row(i, ids, max_tokens, req.stop, sampling, _row_seed(req.seed, i), tokenizer, loop,
                             events, loop.create_future()))  # fmt: skip
        batcher.submit(rows)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": cfg.model_name}  # fmt: skip
        if req.stream:  # Starlette cancels the stream when the client disconnects; `_stream` then cancels the rows
            return StreamingResponse(_stream(head, rows, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        futures = [r.done for r in rows]
        gone = asyncio.ensure_future(_disconnect(request))
        try:
            while not gone.done() and not all(f.done() for f in futures):
                await asyncio.wait([gone, *(f for f in futures if not f.done())], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not all(f.done() for f in futures):  # the client left (or the server is stopping): stop its rows
                for r in rows:
                    r.cancelled = r.cancelled or r.finish_reason is None
                for f in futures:
                    f.cancel()
        if any(f.cancelled() for f in futures):
            return Response(status_code=499)  # never reaches the client; counted in the metrics as "client closed"
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            return _error(500, f"generation failed: {errors[0]}")
        prompt_tokens = sum(len(r.ids) for r in rows)
        completion_tokens = sum(len(r.tokens) for r in rows)
        return {
            **head,
            "choices": [
                {"text": r.text, "index": r.index, "logprobs": None, "finish_reason": r.finish_reason} for r in rows
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    return app


def _row_seed(seed: int | None, index: int) -> int | None:
    """The seed of prompt `index` of a request: the request's own for the first, distinct ones after it."""
    return None if seed is None else (seed + index * 0x9E3779B97F4A7C15) % (MAX_SEED + 1)


async def _disconnect(request: Request) -> None:
    """Returns once the client has disconnected (the body is already read, so only that message is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refusing (413) anything larger than `limit` before reading it all, and (408)
    a body that does not arrive in full within `timeout_s`, so a slow sender cannot hold a connection."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body is {int(declared)} bytes; the limit is {limit}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    body = bytearray()
    while True:
        try:
            message = await asyncio.wait_for(request.receive(), max(deadline - loop.time(), 0))
        except asyncio.TimeoutError:
            raise RequestError(408, f"the request body did not arrive within {timeout_s:g} s",
                               headers={"Connection": "close"}) from None  # fmt: skip
        if message["type"] == "http.disconnect":
            raise _ClientGone
        body += message.get("body", b"")
        if len(body) > limit:
            raise RequestError(413, f"request body exceeds the limit of {limit} bytes")
        if not message.get("more_body", False):
            return bytes(body)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse(body: bytes) -> CompletionRequest:
    try:
        data = json.loads(body, parse_constant=_no_constants)
    except RecursionError:
        raise RequestError(400, "the request body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # bad JSON, bad UTF-8, NaN/Infinity, integers beyond Python's digit limit
        raise RequestError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError(400, "the request body must be a JSON object")
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None  # the request's field, not pydantic's union branch
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        raise RequestError(400, f"invalid request: {problems}", param) from None


async def _stream(head: dict[str, Any], rows: list[_Row], events: asyncio.Queue) -> AsyncIterator[str]:
    """Server-sent events: one chunk per text delta, a closing chunk per prompt, then [DONE]."""

    def chunk(index: int, text: str, reason: str | None) -> str:
        choice = {"text": text, "index": index, "logprobs": None, "finish_reason": reason}
        return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

    open_rows = len(rows)
    try:
        while open_rows:
            index, payload, reason = await events.get()
            if reason == "error":
                err = {"error": {"message": f"generation failed: {payload}", "type": "server_error"}}
                yield f"data: {json.dumps(err)}\n\n"
                return
            yield chunk(index, payload, reason)
            open_rows -= reason is not None
        yield "data: [DONE]\n\n"
    finally:
        for r in rows:  # a client that went away stops its rows from being decoded further
            r.cancelled = r.cancelled or r.finish_reason is None


# ----------------------------------------------------------------------------- running


class _HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing connections that do not finish a request's headers in time.

    uvicorn times out idle keep-alive connections but not a client trickling its headers (or
    sending nothing after connecting); this arms a timer whenever the connection is between
    requests and data (or nothing) arrives, and disarms it once a request's headers are parsed.
    """

    header_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:  # between requests: headers are due
            self._arm()
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        self._header_timer = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app: FastAPI, **kwargs: Any) -> Any:
    """A `uvicorn.Config` for `app` with the header, body and keep-alive limits of its `ServerConfig`."""
    import uvicorn

    cfg: ServerConfig = getattr(app.state, "config", None) or ServerConfig()
    protocol = type("HeaderTimeoutH11", (_HeaderTimeoutH11,), {"header_timeout_s": cfg.header_timeout_s})
    return uvicorn.Config(app, http=protocol, timeout_keep_alive=cfg.keep_alive_timeout_s,  # type: ignore[arg-type]
                          h11_max_incomplete_event_size=cfg.max_header_bytes, **kwargs)  # fmt: skip


@contextlib.contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread; yields its base URL (port 0: any free port)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn_config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start; see the log above")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def resolve_api_key(api_key_file: str | Path | None = None) -> str | None:
    """The bearer token: the first line of `api_key_file`, else $REFINERY_API_KEY, else None (no auth)."""
    if api_key_file is not None:
        path = Path(api_key_file)
        if not path.is_file():
            raise FileNotFoundError(f"API key file {path} does not exist")
        key = path.read_text(encoding="utf-8").strip()
        if not key:
            raise ValueError(f"API key file {path} is empty")
        return key
    return os.environ.get(API_KEY_ENV, "").strip() or None


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(
    checkpoint_or_model_uri: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    int8: bool = False,
    root: str | Path = ".refinery",
    tokenizer_file: str | Path | None = None,
    adapter: str | Path | None = None,
    config: ServerConfig | None = None,
    device: str = "cpu",
    log_level: str = "info",
    api_key_file: str | Path | None = None,
) -> None:
    """Load a model and serve it until interrupted (Ctrl-C). Binds loopback unless `host` says otherwise.

    The API key is `config.api_key`, else the first line of `api_key_file`, else $REFINERY_API_KEY.
    """
    import uvicorn

    config = config or ServerConfig()
    if config.api_key is None:
        config = config.model_copy(update={"api_key": resolve_api_key(api_key_file)})
    if config.api_key is None and not is_loopback(host):
        print(f"warning: serving on {host} without an API key: anyone who can reach this port can use the model; "
              f"set --api-key-file or ${API_KEY_ENV}", file=sys.stderr)  # fmt: skip
    model, tokenizer = load_for_serving(checkpoint_or_model_uri, root, tokenizer_file, adapter, int8=int8, device=device)
    app = create_app(model, tokenizer, config)
    uvicorn.Server(uvicorn_config(app, host=host, port=port, log_level=log_level)).run()
