"""The HTTP side of ``alignkit serve``: OpenAI request checking, response shapes, errors, auth, limits.

Bodies are read and checked here, not by FastAPI's automatic parsing, so that every bad request gets OpenAI's
error shape ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status: 400 for invalid JSON, wrong
types or values (``param`` names the field), 401 for a missing or wrong API key, 404 for an unknown model or
route, 413 for a body over the size limit, 429 when too many requests are queued.
"""

from __future__ import annotations

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
from alignkit.serve.engine import Engine, Row

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
        await engine.submit(rows, settings.temperature, settings.top_p, req.seed, settings.min_tokens)
        choices = [_completion_choice(i, row, settings.stop, tokenizer, req) for i, row in enumerate(rows)]
        out = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
               "model": name, "choices": [c for c, _ in choices], "usage": _usage(prompts, choices),
               "system_fingerprint": None}
        if req.stream:
            return _sse(_completion_chunks(out, choices, tokenizer, req))
        return out

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
        await engine.submit(rows, settings.temperature, settings.top_p, req.seed, settings.min_tokens)
        choices = [_chat_choice(i, row, settings.stop, tokenizer, req) for i, row in enumerate(rows)]
        out = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
               "model": name, "choices": [c for c, _ in choices], "usage": _usage([prompt_ids], choices),
               "system_fingerprint": None}
        if req.stream:
            return _sse(_chat_chunks(out, choices, tokenizer, req))
        return out

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


def _finish(row: Row, stop: list[str], tokenizer) -> _Text:
    tokens = row.tokens[:-1] if row.ended else list(row.tokens)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    reason = "stop" if row.ended else "length"
    hits = [text.find(s) for s in stop if s in text]
    if hits:
        # the fewest tokens whose text already holds a stop string; the text ends before that string
        for k in range(1, len(tokens) + 1):
            prefix = tokenizer.decode(tokens[:k], skip_special_tokens=True)
            if any(s in prefix for s in stop):
                tokens = tokens[:k]
                break
        text, reason = text[: min(hits)], "stop"
        return _Text(text, tokens, reason, len(tokens))
    return _Text(text, tokens, reason, len(row.tokens))


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


def _pieces(done: _Text, tokenizer) -> list[str]:
    """The text split at token boundaries: piece k is what token k adds. A token that ends inside a UTF-8
    character adds nothing until the character is complete; the pieces always concatenate to the text."""
    pieces, emitted = [], 0
    for k in range(1, len(done.tokens) + 1):
        prefix = tokenizer.decode(done.tokens[:k], skip_special_tokens=True)
        end = emitted if prefix.endswith("\ufffd") else min(len(prefix), len(done.text))
        end = max(end, emitted)
        pieces.append(done.text[emitted:end])
        emitted = end
    if not pieces:
        pieces = [""]
    pieces[-1] += done.text[emitted:]
    return pieces


def _sse(chunks) -> StreamingResponse:
    async def events():
        for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _include_usage(req: _Request) -> bool:
    return bool(req.stream_options and req.stream_options.get("include_usage"))


def _completion_chunks(out: dict, choices, tokenizer, req: CompletionRequest):
    """Token-by-token chunks of a finished completion (the sampler decodes a whole batch before anything is
    sent, so streaming gives OpenAI's wire format, not lower latency)."""
    head = {"id": out["id"], "object": "text_completion", "created": out["created"], "model": out["model"]}
    for choice, done in choices:
        pieces = _pieces(done, tokenizer)
        if req.echo:
            pieces[0] = choice["text"][: len(choice["text"]) - len(done.text)] + pieces[0]
        lp = choice["logprobs"]
        n_echo = len(lp["tokens"]) - len(done.tokens) if lp else 0
        for k, piece in enumerate(pieces):
            last = k == len(pieces) - 1
            item = {"index": choice["index"], "text": piece, "logprobs": None,
                    "finish_reason": choice["finish_reason"] if last else None}
            if lp and done.tokens:
                at = slice(0 if k == 0 else n_echo + k, n_echo + k + 1)
                item["logprobs"] = {key: values[at] for key, values in lp.items()}
            if last and "candidate_logprobs" in choice:
                item["candidate_logprobs"] = choice["candidate_logprobs"]
            yield {**head, "choices": [item]}
    if _include_usage(req):
        yield {**head, "choices": [], "usage": out["usage"]}


def _chat_chunks(out: dict, choices, tokenizer, req: ChatRequest):
    head = {"id": out["id"], "object": "chat.completion.chunk", "created": out["created"], "model": out["model"],
            "system_fingerprint": None}
    for choice, done in choices:
        index = choice["index"]
        yield {**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}]}
        content = choice["logprobs"]["content"] if choice["logprobs"] else None
        pieces = _pieces(done, tokenizer)
        for k, piece in enumerate(pieces):
            last = k == len(pieces) - 1
            item = {"index": index, "delta": {"content": piece}, "logprobs": None,
                    "finish_reason": choice["finish_reason"] if last else None}
            if content is not None:
                item["logprobs"] = {"content": content[k : k + 1], "refusal": None}
            if last and "candidate_logprobs" in choice:
                item["candidate_logprobs"] = choice["candidate_logprobs"]
            yield {**head, "choices": [item]}
    if _include_usage(req):
        yield {**head, "choices": [], "usage": out["usage"]}
