"""An HTTP completions server shaped like OpenAI's `/v1/completions`, with request batching.

    POST /v1/completions   {"prompt": "def ", "max_tokens": 32, "temperature": 0.8, "stream": true}
    GET  /health           status, model name, context length, int8, queue depth, batches run
    GET  /v1/models        the one model served, in OpenAI's list shape

Why it is built this way:

- **Batching.** Requests land in an asyncio queue. One batcher task takes the
  first waiting request, keeps collecting for `batch_window_ms` (or until
  `max_batch_size` prompts), and runs them as one left-padded `generate` call in
  a worker thread, so the event loop keeps accepting requests and streaming
  tokens meanwhile. Prompts batch together only when they share the sampling
  settings (temperature, top_p, seed) and fit the context side by side;
  `generate` decodes each row exactly as it would alone, so batching changes
  throughput, not answers (greedy answers are identical; sampled ones depend on
  the random stream of the batch, as they would under any server).
- **Validation first.** The body size is checked before it is read in full
  (413), then JSON (400), then the fields (400, naming the field, unknown fields
  rejected), then the token limits (400). Errors use OpenAI's
  `{"error": {"message", "type", "param", "code"}}` shape so client libraries
  show the message.
- **Streaming** is server-sent events (`data: {chunk}` ... `data: [DONE]`). Text
  is released only once it can no longer turn out to be the start of a stop
  sequence, and never in the middle of a multi-byte character.

`run(...)` loads a checkpoint, an MLflow model URI or a run root's trained model
(optionally with LoRA adapters and int8 weights; see `refinery.serving.loading`)
and serves it with uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from tokenizers import Tokenizer

from refinery.model.generate import generate
from refinery.model.quantize import is_quantized
from refinery.serving.loading import load_for_serving

EOT = "<|endoftext|>"


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


class CompletionRequest(BaseModel):
    """The subset of OpenAI's completions request this server honours; anything else is an error."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | list[str] = Field(default="", description="text to continue, or a list of texts")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(default=None, validate_default=True, description="up to 4 stop strings")
    stream: bool = False
    seed: int | None = None
    user: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_list(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must be a string or a non-empty list of strings")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be up to 4 non-empty strings")
        return stops

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class RequestError(Exception):
    """A client error, answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status
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
    sampling: tuple[float, float, int | None]  # (temperature, top_p, seed): rows batch only with equals
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


# ----------------------------------------------------------------------------- the batcher


class Batcher:
    """Collects rows for a few milliseconds and decodes them together, one batch at a time."""

    def __init__(self, model: torch.nn.Module, eot_id: int, cfg: ServerConfig) -> None:
        self.model, self.eot_id, self.cfg = model, eot_id, cfg
        self.context = int(model.cfg.seq_len)
        self.queue: asyncio.Queue[_Row] = asyncio.Queue()
        self.pending = 0
        self.batches = 0
        self.largest_batch = 0
        self._task: asyncio.Task | None = None

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
            for batch in self._plan([r for r in rows if not r.cancelled]):
                await asyncio.to_thread(self._run, batch)
            self.pending -= len(rows)

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
        temperature, top_p, seed = rows[0].sampling

        def on_token(i: int, token: int) -> None:
            rows[i].add(token)
            if all(r.finished for r in rows):
                raise _AllDone

        error: BaseException | None = None
        try:
            generate(
                self.model,
                [r.ids for r in rows],
                max_new_tokens=max(r.max_tokens for r in rows),
                temperature=temperature,
                top_p=top_p if top_p < 1.0 else None,
                eos_id=self.eot_id,
                seed=seed if seed is not None else random.randrange(2**31),
                on_token=on_token,
            )
        except _AllDone:
            pass
        except Exception as exc:  # noqa: BLE001 - handed to the waiting requests as a 500
            error = exc
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
    batcher = Batcher(model, eot_id, cfg)

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

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param, exc.code)

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
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "owned_by": "refinery"}]}

    @app.post(
        "/v1/completions",
        openapi_extra={
            "requestBody": {"content": {"application/json": {"schema": CompletionRequest.model_json_schema()}}}
        },
    )
    async def completions(request: Request) -> Any:
        req = _parse(await _read_body(request, cfg.max_body_bytes))
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
            rows.append(_Row(i, ids, max_tokens, req.stop, (req.temperature, req.top_p, req.seed), tokenizer, loop,
                             events, loop.create_future()))  # fmt: skip
        batcher.submit(rows)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": cfg.model_name}  # fmt: skip
        if req.stream:
            return StreamingResponse(_stream(head, rows, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        try:
            await asyncio.gather(*(r.done for r in rows))
        except Exception as exc:  # noqa: BLE001
            return _error(500, f"generation failed: {exc}")
        except asyncio.CancelledError:
            for r in rows:
                r.cancelled = True
            raise
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


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything larger than `limit` before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body is {int(declared)} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"request body exceeds the limit of {limit} bytes")
    return bytes(body)


def _parse(body: bytes) -> CompletionRequest:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError(400, "the request body must be a JSON object")
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
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


@contextlib.contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread; yields its base URL (port 0: any free port)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
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
) -> None:
    """Load a model and serve it until interrupted (Ctrl-C). Binds loopback unless `host` says otherwise."""
    import uvicorn

    model, tokenizer = load_for_serving(checkpoint_or_model_uri, root, tokenizer_file, adapter, int8=int8, device=device)
    uvicorn.run(create_app(model, tokenizer, config), host=host, port=port, log_level=log_level)
