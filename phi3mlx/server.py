"""``phi3mlx serve``: an OpenAI-compatible HTTP API over the continuous-batching engine (Starlette + uvicorn).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``.
Streaming answers are server-sent events ending with ``data: [DONE]``. Errors are OpenAI-style JSON
(``{"error": {"message", "type", "param", "code"}}``) with status 400 (bad request), 401 (API key),
403 (a local image path the server does not take), 404 (model, route), 413 (body too large), 429 (queue
full) or 500; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import ipaddress
import json
import os
import secrets
import socket
import threading
import time
import uuid
from typing import Optional

import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .errors import Phi3MLXError
from .processor import Processor
from .serving import Delta, Done, Engine, QueueFull, Request


class _AnyPath:
    def __repr__(self) -> str:
        return "ANY_PATH"


ANY_PATH = _AnyPath()  # Server(image_dir=ANY_PATH): a request may name any local image file

MAX_BODY = 32 * 1024 * 1024  # bytes (images come as data: URLs)
MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


# ---------------------------------------------------------------------------------- validation

_NUM = (int, float)


def _field(body: dict, name: str, types, default=None, check=None, why: str = ""):
    """body[name] if it has one of ``types`` (bool is no number) and passes ``check``, else a 400."""
    v = body.get(name, default)
    if v is None:
        return default
    ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in (types if isinstance(types, tuple)
                                                                           else (types,)))
    if not ok or (check is not None and not check(v)):
        raise APIError(400, f"'{name}' {why or 'has the wrong type'} (got {json.dumps(v)[:80]})", param=name)
    return v


def sampling(body: dict, context: int) -> dict:
    """The generation settings of a request body, validated (every problem is a 400 naming the field)."""
    _field(body, "n", int, 1, lambda v: v == 1, "must be 1 (one choice per request)")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    mt = _field(body, name, int, None, lambda v: v > 0, "must be a positive integer")
    temperature = _field(body, "temperature", _NUM, 1.0, lambda v: 0 <= v <= 2, "must be a number in [0, 2]")
    top_p = _field(body, "top_p", _NUM, 1.0, lambda v: 0 < v <= 1, "must be a number in (0, 1]")
    seed = _field(body, "seed", int, None, lambda v: 0 <= v < 2**63, "must be an integer in [0, 2^63)")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4):
        raise APIError(400, f"'stop' must be a string or a list of at most 4 strings (got {json.dumps(stop)[:80]})",
                       param="stop")
    for k in ("frequency_penalty", "presence_penalty"):
        _field(body, k, _NUM, 0, lambda v: v == 0, "is not supported (only 0)")
    _field(body, "stream", bool, False)
    _field(body, "user", str, None)
    return {"max_tokens": mt if mt is not None else context, "temperature": float(temperature),
            "top_p": float(top_p), "seed": seed, "stop": stop}


# ---------------------------------------------------------------------------------- the app


class _Relay:
    """Engine events to the event loop in bulk: the engine thread ``put``s (queue, event) pairs during a
    round and ``kick``s once after it, so the loop wakes once per decoding step, not once per token of
    every stream (under load those wake-ups were most of the loop's work)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list = []
        self._scheduled = False

    def put(self, q: asyncio.Queue, ev) -> None:
        with self._lock:
            self._items.append((q, ev))

    def kick(self) -> None:
        with self._lock:
            if self._scheduled or not self._items:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the loop has closed (server shutting down): nobody is listening
            with self._lock:
                self._items, self._scheduled = [], False

    def _flush(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for q, ev in items:
            q.put_nowait(ev)



class Server:
    def __init__(self, model, tokenizer, model_id: str, api_key: Optional[str] = None, max_batch: int = 16,
                 max_queue: int = 64, engine: Optional[Engine] = None, image_dir=None,
                 compile_steps: Optional[bool] = None, blas_threads: Optional[int] = None):
        self.model, self.tokenizer, self.model_id, self.api_key = model, tokenizer, model_id, api_key
        # local image paths a request may name: none (None, the default), any (ANY_PATH), or those in a folder
        self.image_dir = image_dir if image_dir is None or image_dir is ANY_PATH else os.path.realpath(image_dir)
        self.context = model.config.context_length
        self.engine = engine or Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue,
                                       compiled=compile_steps, blas=blas_threads)
        self.created = int(time.time())
        self._relay: Optional[_Relay] = None
        self.engine.on_round(self._kick)
        self.app = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ], lifespan=self._lifespan, exception_handlers={404: self._not_found, 405: self._not_allowed})

    def _relay_for(self, loop: asyncio.AbstractEventLoop) -> _Relay:
        """The relay into ``loop`` (made on first use there, replacing one into an earlier loop)."""
        if self._relay is None or self._relay.loop is not loop:
            self._relay = _Relay(loop)
        return self._relay

    def _kick(self) -> None:
        """After every engine round: the current relay hands its events over (one listener per Server)."""
        relay = self._relay
        if relay is not None:
            relay.kick()

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self.engine.start()
        try:
            yield
        finally:
            self.engine.stop()

    async def _not_found(self, request, exc):
        return APIError(404, f"no route {request.method} {request.url.path}", code="not_found").response()

    async def _not_allowed(self, request, exc):
        return APIError(405, f"{request.method} is not allowed on {request.url.path}").response()

    # -------------------------------------------------------------------------- routes

    async def health(self, request: HTTPRequest):
        return JSONResponse({"status": "ok", **self.engine.load})

    async def models(self, request: HTTPRequest):
        try:
            self._auth(request)
        except APIError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [{"id": self.model_id, "object": "model",
                                                         "created": self.created, "owned_by": "phi3mlx"}]})

    async def chat(self, request: HTTPRequest):
        return await self._serve(request, chat=True)

    async def completions(self, request: HTTPRequest):
        return await self._serve(request, chat=False)

    # -------------------------------------------------------------------------- helpers

    def _auth(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not got.startswith("Bearer ") or not secrets.compare_digest(got[7:].strip(), self.api_key):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           type_="authentication_error", code="invalid_api_key")

    async def _body(self, request: HTTPRequest) -> dict:
        """The JSON body. One over MAX_BODY is read to its end (up to twice the limit, so the client gets
        the 413 rather than a reset connection) and refused."""
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > 2 * MAX_BODY:
            raise APIError(413, f"the request body is {int(size)} bytes; the limit is {MAX_BODY}")
        parts, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total <= MAX_BODY:
                parts.append(chunk)
            elif total > 2 * MAX_BODY:
                break
        if total > MAX_BODY:
            raise APIError(413, f"the request body is over the limit of {MAX_BODY} bytes")
        try:
            body = json.loads(b"".join(parts))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}")
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        return body

    def _check_model(self, body: dict) -> None:
        name = body.get("model")
        if name is None:
            raise APIError(400, "'model' is required", param="model")
        if not isinstance(name, str):
            raise APIError(400, "'model' must be a string", param="model")
        if name not in (self.model_id, os.path.basename(self.model_id.rstrip("/")), "default"):
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{self.model_id}'",
                           param="model", code="model_not_found")

    def _chat_prompt(self, body: dict) -> tuple:
        """(ids, None) or (None, (text, images)) for a vision model's prompt with images."""
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise APIError(400, "'messages' must be a non-empty list", param="messages")
        out, images = [], []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise APIError(400, f"messages[{i}] must be an object with a 'role'", param="messages")
            if m["role"] not in ("system", "user", "assistant", "developer"):
                raise APIError(400, f"messages[{i}].role {m['role']!r} is not one of system, user, assistant",
                               param="messages")
            content = m.get("content")
            if isinstance(content, list):
                text = ""
                for part in content:
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind == "text" and isinstance(part.get("text"), str):
                        text += part["text"]
                    elif kind == "image_url":
                        url = part.get("image_url")
                        url = url.get("url") if isinstance(url, dict) else url
                        if not isinstance(url, str):
                            raise APIError(400, f"messages[{i}]: an image_url part needs a 'url'", param="messages")
                        images.append(_image(url, self.image_dir))
                        text += f"<|image_{len(images)}|>\n"
                    else:
                        raise APIError(400, f"messages[{i}]: content parts must be text or image_url",
                                       param="messages")
                content = text
            elif not isinstance(content, str):
                raise APIError(400, f"messages[{i}].content must be a string or a list of parts", param="messages")
            out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
        if images and not (self.model.takes_images and isinstance(self.tokenizer, Processor)):
            raise APIError(400, f"this model ({self.model.model_type}) takes no images", param="messages")
        if images:
            return None, (self.tokenizer.apply_chat_template(out, add_generation_prompt=True, tokenize=False), images)
        return self.tokenizer.apply_chat_template(out, add_generation_prompt=True, tokenize=True), None

    def _completion_prompt(self, body: dict, count_chars: bool) -> tuple:
        """(token ids, characters of the prompt's text: counted with ``count_chars``, for logprobs' offsets,
        else 0)."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "'prompt' is empty", param="prompt")
            return self.tokenizer.encode(prompt), len(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = self.model.config.vocab_size
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"token ids must be in [0, {vocab}): got {bad[0]}", param="prompt")
            if not count_chars:
                return prompt, 0
            try:  # the text the ids stand for, special tokens (a BOS) left out
                return prompt, len(self.tokenizer.decode(prompt, skip_special_tokens=True))
            except ValueError as e:  # ids the model has but its tokenizer does not (a padded vocabulary)
                raise APIError(400, f"the prompt's token ids cannot be decoded: {e}", param="prompt") from None
        raise APIError(400, "'prompt' must be a string or a list of token ids", param="prompt")

    async def _serve(self, request: HTTPRequest, chat: bool):
        try:
            self._auth(request)
            body = await self._body(request)
            self._check_model(body)
            settings = sampling(body, self.context)
            lp, prompt_chars = None, 0
            if chat:
                if _field(body, "logprobs", bool, False):
                    lp = _field(body, "top_logprobs", int, 0, lambda v: 0 <= v <= MAX_TOP_LOGPROBS,
                                f"must be an integer in [0, {MAX_TOP_LOGPROBS}]")
                ids, vision = self._chat_prompt(body)
            else:
                lp = _field(body, "logprobs", int, None, lambda v: 0 <= v <= 5, "must be an integer in [0, 5]")
                (ids, prompt_chars), vision = self._completion_prompt(body, lp is not None), None
            if ids is not None and len(ids) >= self.context:
                raise APIError(400, f"the prompt has {len(ids)} tokens but the model's context is {self.context} "
                               "tokens", param="messages" if chat else "prompt", code="context_length_exceeded")
            stream = bool(body.get("stream", False))
            include_usage = stream and isinstance(body.get("stream_options"), dict) and \
                bool(body["stream_options"].get("include_usage"))
        except APIError as e:
            return e.response()
        except Phi3MLXError as e:  # the tokenizer's or the processor's word on the request's text
            return APIError(400, str(e)).response()
        relay = self._relay_for(asyncio.get_running_loop())
        events: asyncio.Queue = asyncio.Queue()

        def emit(ev):
            relay.put(events, ev)

        req = Request(emit=emit, ids=ids, text=vision[0] if vision else None, images=vision[1] if vision else (),
                      logprobs=lp, **settings)
        try:
            self.engine.submit(req)
        except QueueFull as e:
            return APIError(429, str(e), type_="rate_limit_error", code="rate_limit_exceeded").response()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if stream:
            return StreamingResponse(self._stream(req, events, rid, created, chat, include_usage, prompt_chars),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self._whole(request, req, events, rid, created, chat, prompt_chars)

    async def _whole(self, request, req: Request, events: asyncio.Queue, rid: str, created: int, chat: bool,
                     prompt_chars: int):
        text, lps = "", []
        checked = time.monotonic()
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                ev = None
            if time.monotonic() - checked >= 0.25:  # whether or not tokens are flowing
                checked = time.monotonic()
                if await request.is_disconnected():
                    req.cancel()
                    return Response(status_code=499)
            if ev is None:
                continue
            if isinstance(ev, Delta):
                text += ev.text
                lps += ev.logprobs
                continue
            break
        if ev.finish_reason == "error":
            return APIError(400 if ev.bad_request else 500, ev.error or "generation failed",
                            type_="invalid_request_error" if ev.bad_request else "server_error").response()
        choice = {"index": 0, "finish_reason": _reason(ev.finish_reason)}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
            choice["logprobs"] = _chat_logprobs(lps) if req.logprobs is not None else None
        else:
            choice["text"] = text
            choice["logprobs"] = _completion_logprobs(lps, prompt_chars) if req.logprobs is not None else None
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": self.model_id, "choices": [choice],
                             "usage": _usage(ev)})

    async def _stream(self, req: Request, events: asyncio.Queue, rid: str, created: int, chat: bool,
                      include_usage: bool, prompt_chars: int):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: Optional[dict], usage=None) -> str:
            d = {"id": rid, "object": kind, "created": created, "model": self.model_id,
                 "choices": [choice] if choice is not None else []}
            if include_usage:
                d["usage"] = usage
            return f"data: {json.dumps(d)}\n\n"

        try:
            if chat:
                yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})
            done = False
            while not done:
                # the events waiting now go out in one write (one event each, as OpenAI's streams)
                evs = [await events.get()]
                while not events.empty() and not isinstance(evs[-1], Done):
                    evs.append(events.get_nowait())
                out = []
                for ev in evs:
                    if isinstance(ev, Delta):
                        if chat:
                            c = {"index": 0, "delta": {"content": ev.text}, "finish_reason": None,
                                 "logprobs": _chat_logprobs(ev.logprobs) if req.logprobs is not None else None}
                        else:
                            c = {"index": 0, "text": ev.text, "finish_reason": None,
                                 "logprobs": (_completion_logprobs(ev.logprobs, prompt_chars)
                                              if req.logprobs is not None else None)}
                        out.append(chunk(c))
                        continue
                    done = True
                    if ev.finish_reason == "error":
                        err = {"error": {"message": ev.error or "generation failed",
                                         "type": "invalid_request_error" if ev.bad_request else "server_error",
                                         "param": None, "code": None}}
                        out.append(f"data: {json.dumps(err)}\n\n")
                        break
                    end = {"index": 0, "finish_reason": _reason(ev.finish_reason), "logprobs": None}
                    end.update({"delta": {}} if chat else {"text": ""})
                    out.append(chunk(end))
                    if include_usage:
                        out.append(chunk(None, _usage(ev)))
                if done:
                    out.append("data: [DONE]\n\n")
                yield "".join(out)
        finally:
            req.cancel()  # a client that went away frees its slot at the next step (no-op once done)


def _reason(r: str) -> str:
    return {"stop": "stop", "length": "length"}.get(r, "stop")


def _usage(ev: Done) -> dict:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": ev.cached_tokens}}


def _chat_logprobs(lps: list) -> dict:
    return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": t.bytes,
                         "top_logprobs": [{"token": x, "logprob": v, "bytes": b} for _, x, v, b in t.top]}
                        for t in lps]}


def _legacy_token(text: str, raw: list) -> str:
    """A token as the completions API names it: its text, or ``bytes:\\x..`` where its bytes are not whole
    UTF-8 characters (so byte tokens do not all read U+FFFD, and keep their own keys in top_logprobs)."""
    try:
        bytes(raw).decode("utf-8")
        return text
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _completion_logprobs(lps: list, start: int) -> dict:
    """The completions API's logprobs. ``text_offset``: where each token's text starts, counted from the
    start of the prompt's text (``start`` characters) as OpenAI counts it, also without echo."""
    top = []
    for t in lps:
        d: dict = {}
        for _, x, v, raw in t.top:  # most likely first: two tokens of the same name keep the likelier
            d.setdefault(_legacy_token(x, raw), v)
        top.append(d)
    return {"tokens": [_legacy_token(t.text, t.bytes) for t in lps], "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": top, "text_offset": [start + t.offset for t in lps]}


def _image(url: str, image_dir=None):
    """An image_url: a data: URL (base64) or a local file path (file:// or plain) that ``image_dir`` allows
    (None: none; ANY_PATH: any; a resolved folder: paths inside it, links resolved, a relative path taken
    from that folder); http(s) is refused."""
    try:
        if url.startswith("data:"):
            head, _, data = url.partition(",")
            if ";base64" not in head:
                raise APIError(400, "a data: image URL must be base64", param="messages")
            return Image.open(io.BytesIO(base64.b64decode(data, validate=False))).convert("RGB")
        path = url[7:] if url.startswith("file://") else url
        if url.startswith(("http://", "https://")):
            raise APIError(400, "image URLs must be data: URLs or local file paths", param="messages")
        if image_dir is None:
            raise APIError(403, "this server takes no local image paths (it listens beyond loopback; start it "
                           "with --image-dir DIR to allow the images in DIR), send a data: URL", param="messages")
        real = os.path.realpath(path if image_dir is ANY_PATH else os.path.join(image_dir, path))
        if image_dir is not ANY_PATH and os.path.commonpath([real, image_dir]) != image_dir:
            raise APIError(403, f"image path {path} is outside the server's --image-dir", param="messages")
        if not os.path.isfile(real):
            raise APIError(400, f"image file not found: {path}", param="messages")
        return Image.open(real).convert("RGB")
    except APIError:
        raise
    except Exception as e:  # noqa: BLE001  (unreadable, truncated, a decompression bomb: the request's image)
        raise APIError(400, f"the image could not be read: {type(e).__name__}: {e}", param="messages")


def check_listen(host: str, port: int) -> None:
    """A one-line error now, before the model loads, if ``host:port`` cannot be listened on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise Phi3MLXError(f"--host {host}: {e.strerror or e}")
    family, kind, proto, _, addr = infos[0]
    s = socket.socket(family, kind, proto)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
    except OSError as e:
        raise Phi3MLXError(f"cannot listen on {host}:{port}: {e.strerror or e}")
    finally:
        s.close()


def build_app(model, tokenizer, model_id: str, api_key: Optional[str] = None, max_batch: int = 16,
              max_queue: int = 64, image_dir=None, compile_steps: Optional[bool] = None,
              blas_threads: Optional[int] = None) -> Server:
    return Server(model, tokenizer, model_id, api_key, max_batch, max_queue, image_dir=image_dir,
                  compile_steps=compile_steps, blas_threads=blas_threads)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_images(host: str, image_dir: Optional[str]):
    """What local image paths a server on ``host`` takes: those in ``image_dir`` (resolved) when given, else
    any path on a loopback address (ANY_PATH) and none (None) on any other."""
    if image_dir is not None:
        return os.path.realpath(image_dir)
    return ANY_PATH if is_loopback(host) else None


def serve(model, tokenizer, model_id: str, host: str = "127.0.0.1", port: int = 8080, api_key: Optional[str] = None,
          max_batch: int = 16, max_queue: int = 64, log_level: str = "info", image_dir: Optional[str] = None,
          compile_steps: Optional[bool] = None, blas_threads: Optional[int] = None) -> None:
    """Run the server until interrupted."""
    server = build_app(model, tokenizer, model_id, api_key, max_batch, max_queue,
                       image_dir=local_images(host, image_dir), compile_steps=compile_steps, blas_threads=blas_threads)
    e = server.engine
    how = ["compiled steps" if e.compiled else "uncompiled steps"]
    if e.blas_threads is not None:
        how.append(f"{e.blas_threads} BLAS thread{'s' if e.blas_threads != 1 else ''}")
    print(f"serving {model_id} at http://{host}:{port}/v1 ({', '.join(how)}; Ctrl-C stops)", flush=True)
    uvicorn.run(server.app, host=host, port=port, log_level=log_level)
