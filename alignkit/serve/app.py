"""The HTTP side of ``alignkit serve``: OpenAI request checking, response shapes, errors, auth, limits.

Bodies are read and checked here, not by FastAPI's automatic parsing, so that every bad request gets OpenAI's
error shape ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status: 400 for invalid JSON, wrong
types or values (``param`` names the field), 401 for a missing or wrong API key, 404 for an unknown model or
route, 413 for a body over the size limit, 429 when too many requests are queued.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from alignkit.config import arg
from alignkit.serve.engine import Engine, Row, StepEvent

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for both endpoints


@dataclass
class ServeConfig:
    model: str = arg("smollm2-135m", "model to serve: bundled name, HF model dir or hub id, or alignkit run dir")
    served_name: str = arg("", "model id clients send and /v1/models lists; empty: the --model value")
    host: str = arg("127.0.0.1", "interface to bind; 0.0.0.0 exposes the server to the network")
    port: int = arg(8000, "TCP port")
    api_key_env: str = arg("", "env var holding the bearer token clients must send; empty: ALIGNKIT_API_KEY if set, else no auth")
    dtype: str = arg("auto", "sampling precision: auto (bf16 only where the hardware has it), fp32, bf16")
    max_batch: int = arg(32, "most rows (prompts x n) decoded together in one sampler call")
    batch_wait_ms: float = arg(5.0, "how long an idle server waits for more requests to batch with the first")
    max_tokens_cap: int = arg(1024, "largest max_tokens a request may ask for (larger: HTTP 400)")
    default_max_tokens: int = arg(256, "max_tokens of a chat request that gives none (completions: 16, as OpenAI)")
    max_n: int = arg(64, "most completions one request may ask for (prompts x n)")
    max_body_bytes: int = arg(1_000_000, "largest request body in bytes (larger: HTTP 413)")
    max_pending: int = arg(256, "most requests queued or running at once (more: HTTP 429)")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def _error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                    code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# ----------------------------------------------------------------------------------------------- request shapes


class _Request(BaseModel):
    # strict: "5" is not an int and 1.0 not an int (ints are still accepted for floats); unknown fields are
    # ignored, as OpenAI-compatible servers do (clients send e.g. `user`)
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    min_tokens: int | None = None  # vLLM's extension: no EOS before this many tokens
    stream: bool | None = None
    stream_options: dict | None = None
    candidate_tokens: list[str] | None = None  # the judge extension: see alignkit/serve/__init__.py


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None


class _TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]


class ChatRequest(_Request):
    messages: list[_Message]
    logprobs: bool | None = None
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "literal"}


def _validation_error(error: ValidationError) -> APIError:
    """First problem as one line: 'messages.0.content: Input should be a valid string'."""
    first = error.errors()[0]
    # drop pydantic's union-member tags ('str', 'list[int]', ...) from the location
    parts = [str(p) for p in first["loc"] if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p))]
    param = ".".join(parts) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    if first["type"] == "missing":
        message = f"missing required field {param!r}"
    return APIError(400, message, param=param)


# ----------------------------------------------------------------------------------------------------- the app


def create_app(model, tokenizer, config: ServeConfig | None = None, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `model`. Run it with uvicorn; the batching engine starts with the app."""
    config = config or ServeConfig()
    name = config.served_name or config.model
    engine = Engine(model, tokenizer, config.max_batch, config.batch_wait_ms, config.dtype, config.max_pending)
    max_context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="alignkit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        headers = {"Retry-After": "1"} if error.status == 429 else None
        return _error_response(error.status, error.message, error.type, error.param, error.code, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return _error_response(error.status_code, f"{request.method} {request.url.path}: {error.detail}", kind)

    @app.exception_handler(Exception)
    async def _internal(request: Request, error: Exception):
        return _error_response(500, f"internal error: {type(error).__name__}: {error}", "server_error")

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    async def read_body(request: Request, shape: type[BaseModel]):
        check_auth(request)
        length = request.headers.get("content-length", "")
        too_big = APIError(413, f"request body over {config.max_body_bytes} bytes", code="request_too_large")
        if length.isdigit() and int(length) > config.max_body_bytes:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_body_bytes:
                raise too_big
        try:
            data = json.loads(body)
        except ValueError as error:
            raise APIError(400, f"request body is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}")
        try:
            parsed = shape.model_validate(data)
        except ValidationError as error:
            raise _validation_error(error) from None
        if parsed.model != name:
            raise APIError(404, f"model {parsed.model!r} is not served here; this server serves {name!r}",
                           param="model", code="model_not_found")
        if engine.busy():
            raise APIError(429, f"server busy: {config.max_pending} requests already queued; retry later",
                           type="rate_limit_error", code="rate_limit_exceeded")
        return parsed

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [_model_card(name, started)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        check_auth(request)
        if model_id != name:
            raise APIError(404, f"model {model_id!r} is not served here", param="model", code="model_not_found")
        return _model_card(name, started)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read_body(request, CompletionRequest)
        settings = _settings(req, req.max_tokens, default_max_tokens=16, config=config)
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {req.logprobs}",
                           param="logprobs")
        prompts = _completion_prompts(req.prompt, tokenizer)
        candidates = _candidate_ids(req.candidate_tokens, tokenizer)
        _check_rows(len(prompts) * settings.n, config)
        rows = [Row(ids, settings.max_tokens, req.logprobs, candidates, bool(req.echo))
                for ids in prompts for _ in range(settings.n)]
        _check_context(rows, max_context, "prompt")
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name}
        if req.stream:
            return _sse(_Stream(engine, rows, settings, req, tokenizer, head, prompts, chat=False))
        await engine.submit(rows, settings.temperature, settings.top_p, req.seed, settings.min_tokens)
        choices = [_completion_choice(i, row, settings.stop, tokenizer, req) for i, row in enumerate(rows)]
        return {**head, "choices": [c for c, _ in choices], "usage": _usage(prompts, choices),
                "system_fingerprint": None}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read_body(request, ChatRequest)
        settings = _settings(req, req.max_completion_tokens or req.max_tokens, config.default_max_tokens, config)
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
                raise APIError(400, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {req.top_logprobs}",
                               param="top_logprobs")
        if not req.messages:
            raise APIError(400, "messages must hold at least one message", param="messages")
        prompt_ids = _chat_prompt(req.messages, tokenizer)
        candidates = _candidate_ids(req.candidate_tokens, tokenizer)
        _check_rows(settings.n, config)
        k = (req.top_logprobs or 0) if req.logprobs else None
        rows = [Row(prompt_ids, settings.max_tokens, k, candidates) for _ in range(settings.n)]
        _check_context(rows, max_context, "messages")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": name}
        if req.stream:
            return _sse(_Stream(engine, rows, settings, req, tokenizer, head, [prompt_ids], chat=True))
        await engine.submit(rows, settings.temperature, settings.top_p, req.seed, settings.min_tokens)
        choices = [_chat_choice(i, row, settings.stop, tokenizer, req) for i, row in enumerate(rows)]
        return {**head, "choices": [c for c, _ in choices], "usage": _usage([prompt_ids], choices),
                "system_fingerprint": None}

    return app


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "alignkit"}


# -------------------------------------------------------------------------------------------- request checking


@dataclass
class _Settings:
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    stop: list[str]
    min_tokens: int


def _settings(req: _Request, max_tokens: int | None, default_max_tokens: int, config: ServeConfig) -> _Settings:
    max_tokens = min(default_max_tokens, config.max_tokens_cap) if max_tokens is None else max_tokens
    if not 1 <= max_tokens <= config.max_tokens_cap:
        raise APIError(400, f"max_tokens must be between 1 and {config.max_tokens_cap}, got {max_tokens}",
                       param="max_tokens")
    temperature = 1.0 if req.temperature is None else req.temperature
    if not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be between 0 and 2, got {temperature}", param="temperature")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p")
    n = 1 if req.n is None else req.n
    if n < 1:
        raise APIError(400, f"n must be at least 1, got {n}", param="n")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise APIError(400, "stop must be up to 4 non-empty strings", param="stop")
    min_tokens = req.min_tokens or 0
    if not 0 <= min_tokens <= max_tokens:
        raise APIError(400, f"min_tokens must be between 0 and max_tokens ({max_tokens}), got {min_tokens}",
                       param="min_tokens")
    return _Settings(max_tokens, temperature, top_p, n, stop, min_tokens)


def _check_rows(n_rows: int, config: ServeConfig) -> None:
    if n_rows > config.max_n:
        raise APIError(400, f"this request asks for {n_rows} completions (prompts x n); the limit is {config.max_n}",
                       param="n")


def _check_context(rows: list[Row], max_context: int | None, param: str) -> None:
    for row in rows:
        if not row.prompt_ids:
            raise APIError(400, "the prompt is empty (0 tokens); give at least one token", param=param)
        if max_context and len(row.prompt_ids) + row.max_tokens > max_context:
            raise APIError(400, f"prompt ({len(row.prompt_ids)} tokens) + max_tokens ({row.max_tokens}) exceeds the "
                           f"model's context of {max_context} tokens", param=param)


def _completion_prompts(prompt, tokenizer) -> list[list[int]]:
    """str | list[str] | list[int] (token ids) | list[list[int]] -> one id list per prompt."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be an empty list", param="prompt")
    out = []
    vocab = len(tokenizer)
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            out.append(tokenizer(p, add_special_tokens=False)["input_ids"])
        else:
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt.{i}: token id {bad[0]} outside the vocabulary [0, {vocab})", param="prompt")
            out.append(list(p))
    return out


def _chat_prompt(messages: list[_Message], tokenizer) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    plain = [{"role": "system" if m.role == "developer" else m.role,
              "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
             for m in messages]
    try:
        text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # noqa: BLE001 - a template may reject e.g. the order of roles
        raise APIError(400, f"the chat template rejected these messages: {error}", param="messages") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _candidate_ids(candidates: list[str] | None, tokenizer) -> list[int] | None:
    if candidates is None:
        return None
    if not candidates:
        raise APIError(400, "candidate_tokens must not be empty", param="candidate_tokens")
    ids = []
    for c in candidates:
        encoded = tokenizer(c, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise APIError(400, f"candidate_tokens: {c!r} is {len(encoded)} tokens for this tokenizer, expected exactly 1",
                           param="candidate_tokens")
        ids.append(encoded[0])
    return ids


# -------------------------------------------------------------------------------------------- response shapes


@dataclass
class _Text:
    """What a row became after stop strings and EOS: its text, the tokens behind it, and why it ended."""

    text: str
    tokens: list[int]  # tokens behind `text` (the EOS dropped; with a stop string, up to the one completing it)
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    generated: int  # tokens the model produced for it, the EOS included


class _Detok:
    """Token ids -> text, one token at a time, with stop strings: what streaming sends and what a whole answer is.

    Incremental decoding (as TGI and vLLM do it): the new text of a token is decode(ids[prefix:]) minus
    decode(ids[prefix:read]) over a short window, and it is released only once it no longer ends in an
    incomplete UTF-8 character (U+FFFD). A stop string ends the text where it starts, at the token that completes
    it; text that could be the start of a stop string is held back until the next token settles it, so nothing
    sent is ever taken back. The released pieces concatenate to ``text``: a streamed answer equals the whole one.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []  # text tokens so far (no EOS)
        self.prefix = self.read = 0  # decode window: ids[prefix:read] is already in `text`
        self.text = ""
        self.sent = 0  # characters of `text` released
        self.generated = 0  # tokens consumed, the EOS included
        self.reason: str | None = None  # "stop" | "length" once the answer has ended

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _release(self, end: int) -> str:
        end = max(end, self.sent)
        piece, self.sent = self.text[self.sent : end], end
        return piece

    def push(self, token: int, eos: bool = False, last: bool = False) -> str:
        """The text this token releases. ``eos``: the token is the EOS; ``last``: no token follows (max_tokens).
        Sets ``reason`` when the answer ends here (EOS, a stop string, or ``last``)."""
        self.generated += 1
        if eos:
            self.reason = "stop"
            return self._release(len(self.text))
        self.ids.append(token)
        before, after = self._decode(self.ids[self.prefix : self.read]), self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and (last or not after.endswith("\ufffd")):
            start = max(0, len(self.text) - max((len(s) for s in self.stop), default=1) + 1)
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.reason = self.text[: max(min(hits), self.sent)], "stop"
                return self._release(len(self.text))
        if last:
            self.reason = "length"
            return self._release(len(self.text))
        end = len(self.text)
        for s in self.stop:  # hold back a tail that may grow into a stop string
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    end = min(end, len(self.text) - k)
                    break
        return self._release(end)


def _finish(row: Row, stop: list[str], tokenizer) -> _Text:
    """A decoded row as the answer: the same `_Detok` steps a stream takes, so both give the same text."""
    detok = _Detok(tokenizer, stop)
    for k, token in enumerate(row.tokens):
        last = k == len(row.tokens) - 1
        detok.push(token, eos=last and row.ended, last=last)
        if detok.reason:
            break
    return _Text(detok.text, detok.ids, detok.reason or "length", detok.generated)


def _token_str(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def _chat_logprobs(row: Row, tokens: list[int], tokenizer) -> dict:
    def entry(token: int, logprob: float) -> dict:
        s = _token_str(tokenizer, token)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode())}

    content = []
    for i, token in enumerate(tokens):
        item = entry(token, row.token_logprobs[i])
        item["top_logprobs"] = [entry(t, lp) for t, lp in row.top[i]]
        content.append(item)
    return {"content": content, "refusal": None}


def _completion_logprobs(row: Row, tokens: list[int], tokenizer, echo: bool) -> dict:
    """Legacy shape: tokens, token_logprobs, top_logprobs (token -> log-prob), text_offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    # with echo the engine scored prompt tokens 1..P-1 first; the first prompt token has no log-prob
    n_prompt = len(row.prompt_ids) - 1 if echo else 0
    scored: list = []
    if echo:
        scored = [(row.prompt_ids[0], None, None)]
        scored += zip(row.prompt_ids[1:], row.token_logprobs[:n_prompt], row.top[:n_prompt], strict=True)
    scored += zip(tokens, row.token_logprobs[n_prompt:], row.top[n_prompt:])  # tokens: a prefix of row.tokens
    for token, logprob, top in scored:
        s = _token_str(tokenizer, token)
        out["tokens"].append(s)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(None if top is None else {_token_str(tokenizer, t): lp for t, lp in top})
        out["text_offset"].append(offset)
        offset += len(s)
    return out


def _completion_choice(index: int, row: Row, stop: list[str], tokenizer, req: CompletionRequest):
    done = _finish(row, stop, tokenizer)
    text = done.text
    if req.echo:
        text = tokenizer.decode(row.prompt_ids, skip_special_tokens=False) + text
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
    if req.logprobs is not None:
        choice["logprobs"] = _completion_logprobs(row, done.tokens, tokenizer, bool(req.echo))
    if row.candidate_ids:
        choice["candidate_logprobs"] = dict(zip(req.candidate_tokens, row.candidate_logprobs, strict=True))
    return choice, done


def _chat_choice(index: int, row: Row, stop: list[str], tokenizer, req: ChatRequest):
    done = _finish(row, stop, tokenizer)
    choice = {"index": index, "message": {"role": "assistant", "content": done.text, "refusal": None},
              "logprobs": None, "finish_reason": done.finish_reason}
    if req.logprobs:
        choice["logprobs"] = _chat_logprobs(row, done.tokens, tokenizer)
    if row.candidate_ids:
        choice["candidate_logprobs"] = dict(zip(req.candidate_tokens, row.candidate_logprobs, strict=True))
    return choice, done


def _usage(prompts: list[list[int]], choices) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(done.generated for _, done in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---------------------------------------------------------------------------------------------------- streaming


def _sse(chunks) -> StreamingResponse:
    async def events():
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _include_usage(req: _Request) -> bool:
    return bool(req.stream_options and req.stream_options.get("include_usage"))


class _Stream:
    """The chunks of a streamed request, sent as the engine decodes: one chunk per generated token (its text
    piece, its log-probs when asked, ``finish_reason`` on the row's last one), choices interleaved by ``index``
    as their tokens come. Chat starts each choice with a role chunk; completions with ``echo`` with a chunk of
    the prompt. ``stream_options.include_usage`` adds a last chunk with ``usage`` and no choices.

    The engine call starts when the response starts. If the client goes away, or a row needs no more tokens
    (a stop string), its rows are marked cancelled, and the batch stops once no row needs another token."""

    def __init__(self, engine: Engine, rows: list[Row], settings: _Settings, req, tokenizer, head: dict,
                 prompts: list[list[int]], chat: bool):
        self.engine, self.rows, self.settings, self.req, self.tokenizer = engine, rows, settings, req, tokenizer
        self.prompts, self.chat = prompts, chat
        self.head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        if chat:
            self.head["system_fingerprint"] = None
        self.want_logprobs = bool(req.logprobs) if chat else req.logprobs is not None
        self.echo = bool(getattr(req, "echo", False))

    def _chunk(self, item: dict) -> dict:
        return {**self.head, "choices": [item]}

    def _token_logprobs(self, event: StepEvent, offset: int) -> dict | None:
        if not self.want_logprobs or event.eos or event.logprob is None:
            return None
        token = _token_str(self.tokenizer, event.token)
        if self.chat:
            def entry(t: int, lp: float) -> dict:
                text = _token_str(self.tokenizer, t)
                return {"token": text, "logprob": lp, "bytes": list(text.encode())}

            item = entry(event.token, event.logprob)
            item["top_logprobs"] = [entry(t, lp) for t, lp in event.top]
            return {"content": [item], "refusal": None}
        return {"tokens": [token], "token_logprobs": [event.logprob],
                "top_logprobs": [{_token_str(self.tokenizer, t): lp for t, lp in event.top}], "text_offset": [offset]}

    def _first_chunks(self, offsets: list[int]):
        for i, row in enumerate(self.rows):
            if self.chat:
                yield self._chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None})
            elif self.echo:
                text = self.tokenizer.decode(row.prompt_ids, skip_special_tokens=False)
                logprobs = None
                if self.want_logprobs:
                    n = len(row.prompt_ids) - 1
                    logprobs = _completion_logprobs(Row(row.prompt_ids, 0, row.top_logprobs, None, True, [], False,
                                                        row.token_logprobs[:n], row.top[:n]), [], self.tokenizer, True)
                    offsets[i] = sum(len(t) for t in logprobs["tokens"])
                yield self._chunk({"index": i, "text": text, "logprobs": logprobs, "finish_reason": None})

    def _item(self, i: int, piece: str, logprobs: dict | None, reason: str | None) -> dict:
        if self.chat:
            item = {"index": i, "delta": {"content": piece}, "logprobs": logprobs, "finish_reason": reason}
        else:
            item = {"index": i, "text": piece, "logprobs": logprobs, "finish_reason": reason}
        row = self.rows[i]
        if reason and row.candidate_ids:
            item["candidate_logprobs"] = dict(zip(self.req.candidate_tokens, row.candidate_logprobs, strict=True))
        return item

    async def __aiter__(self):
        settings, rows = self.settings, self.rows
        events: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(self.engine.submit(rows, settings.temperature, settings.top_p, self.req.seed,
                                                        settings.min_tokens, events=events))
        detoks = [_Detok(self.tokenizer, settings.stop) for _ in rows]
        offsets = [0] * len(rows)
        try:
            if self.echo and self.want_logprobs:
                # the prompt's log-probs are scored before the first token; wait for it before the echo chunk
                first = await events.get()
                pending = [first]
            else:
                pending = []
            for chunk in self._first_chunks(offsets):
                yield chunk
            while True:
                batch = pending.pop(0) if pending else await events.get()
                if batch is None:
                    break
                for event in batch:
                    i, detok = event.row, detoks[event.row]
                    if detok.reason:
                        continue  # ended by a stop string; the engine may still be decoding it
                    piece = detok.push(event.token, eos=event.eos, last=event.done and not event.eos)
                    logprobs = self._token_logprobs(event, offsets[i])
                    if logprobs and not self.chat:
                        offsets[i] += len(logprobs["tokens"][0])
                    if detok.reason:
                        rows[i].cancelled = True
                    yield self._chunk(self._item(i, piece, logprobs, detok.reason))
            try:
                await task
            except Exception as error:  # noqa: BLE001 - the status is already sent: report it in the stream
                yield {"error": {"message": f"internal error: {type(error).__name__}: {error}", "type": "server_error",
                                 "param": None, "code": None}}
                return
            for i, detok in enumerate(detoks):
                if not detok.reason:  # a row the engine stopped early (not expected): close it
                    detok.reason = "length"
                    yield self._chunk(self._item(i, detok._release(len(detok.text)), None, "length"))
            if _include_usage(self.req):
                prompt_tokens = sum(len(p) for p in self.prompts)
                completion_tokens = sum(d.generated for d in detoks)
                yield {**self.head, "choices": [],
                       "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens}}
        finally:
            for row in rows:
                row.cancelled = True
            if not task.done():
                task.cancel()
