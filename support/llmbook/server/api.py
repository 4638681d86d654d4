# Generated from notebooks/11_serving.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""The HTTP side: OpenAI's wire format over FastAPI, every request handed to the engine
loop, every answer streamed back as server-sent events or returned whole. Written in
notebooks/11_serving.ipynb."""
import asyncio
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from llmbook.engine import BackendUnavailable
from llmbook.sampling import Sampler
from llmbook.server.metrics import Metrics
from llmbook.server.scheduler import EngineLoop, Job, OneAtATime
from llmbook.server.text import TextStream

log = logging.getLogger("llmbook.server")


@dataclass
class ServerConfig:
    backend: str
    max_batch: int = 16
    cache_tokens: int = 16384  # tokens the paged KV cache holds, all sequences together
    prefill_chunk: int = 0  # prompt tokens per iteration; 0: each prompt whole
    prefix_entries: int = 8  # prompt prefixes kept for reuse; 0: no prefix cache
    static: bool = False  # static batching instead of continuous
    max_waiting: int = 256  # requests queued beyond the batch before 503


class APIError(Exception):
    """A request the server refuses: its status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.kind, self.headers = status, param, kind, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": str(self), "type": self.kind,
                          "param": self.param, "code": None}}
        return JSONResponse(body, self.status, headers=self.headers)


# ---- reading a request ------------------------------------------------------------
def _number(body: dict, name: str, default, low=None, high=None, integer=False,
            open_low=False):
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"'{name}' must be {kind}, got {json.dumps(value)}", name)
    if (low is not None and (value <= low if open_low else value < low)) or (
            high is not None and value > high):
        lo = "(" if open_low else "["
        bounds = f"in {lo}{low}, {high}]" if high is not None else f"at least {low}"
        raise APIError(400, f"'{name}' must be {bounds}, got {value}", name)
    return value


def sampling(body: dict) -> dict:
    """The sampling settings of a request, checked; OpenAI's defaults where absent
    (temperature 1), with vLLM's top_k and ignore_eos."""
    if (n := _number(body, "n", 1, integer=True)) != 1:
        raise APIError(400, f"'n' must be 1: this server makes one answer per "
                            f"request, got {n}", "n")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list)
                             or not all(isinstance(s, str) for s in stop)):
        raise APIError(400, "'stop' must be a string or a list of strings", "stop")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options")
    for flag in ("stream", "ignore_eos"):
        if not isinstance(body.get(flag, False), bool):
            raise APIError(400, f"'{flag}' must be true or false", flag)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return {
        "temperature": _number(body, "temperature", 1.0, 0, 2),
        "top_p": _number(body, "top_p", 1.0, 0, 1, open_low=True),
        "top_k": max(0, _number(body, "top_k", 0, -1, integer=True)),  # -1: off
        "seed": _number(body, "seed", None, integer=True),
        "max_tokens": _number({name: max_tokens}, name, None, 1, integer=True),
        "stop": stop or [],
        "stream": body.get("stream", False),
        "include_usage": bool(options.get("include_usage", False)),
        "ignore_eos": body.get("ignore_eos", False),
    }


def chat_prompt(tokenizer, body: dict) -> list[int]:
    """The messages rendered with the model's chat template, as token ids."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of messages",
                       "messages")
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer, so no chat template: send "
                            "token ids to /v1/completions", "messages")
    rendered = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       for p in content):
                raise APIError(400, f"messages[{i}]: only text content is supported",
                               "messages")
            content = "".join(p.get("text", "") for p in content)
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(content, str)):
            raise APIError(400, f"messages[{i}] must have a 'role' and a text "
                                "'content'", "messages")
        rendered.append({"role": m["role"], "content": content})
    try:
        text = tokenizer.apply_chat_template(rendered, add_generation_prompt=True,
                                             tokenize=False)
    except Exception as e:  # the template's own check (a role it does not know)
        raise APIError(400, f"the chat template refused the messages: {e}",
                       "messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


def completion_prompt(tokenizer, body: dict, vocab_size: int) -> list[int]:
    """A completion's prompt: a string, or token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send 'prompt' as token "
                                "ids", "prompt")
        return tokenizer.encode(prompt)
    if (isinstance(prompt, list) and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        if bad := [t for t in prompt if not 0 <= t < vocab_size]:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary "
                                f"[0, {vocab_size})", "prompt")
        return prompt
    raise APIError(400, "'prompt' must be a non-empty string or a list of token ids",
                   "prompt")


# ---- the server -------------------------------------------------------------------
class Server:
    """The engine loop and what the handlers need, made ready in the background: the
    HTTP port answers (/health says "loading") while the engine compiles."""

    def __init__(self, bundle, config: ServerConfig):
        self.bundle, self.config = bundle, config
        self.metrics = Metrics()
        self.loop: EngineLoop | None = None
        self.ready = threading.Event()
        self.failed: str | None = None
        self.max_context = 0
        self.capacity = 0  # tokens the cache holds

    def load(self):
        """Build the engine and its runner, run one request through it (the first
        call compiles or allocates), then start the loop."""
        from llmbook import backends

        c = self.config
        engine = backends.get_backend(c.backend, self.bundle)
        try:  # prefix entries are sequences of the cache too
            runner = engine.batch_runner(c.max_batch + c.prefix_entries, c.cache_tokens)
            max_batch, prefix = c.max_batch, c.prefix_entries
        except BackendUnavailable as why:
            log.info("%s; it serves one request at a time", why)
            runner, max_batch, prefix = OneAtATime(engine), 1, 0
        self.max_context = engine.max_context
        self.capacity = (runner.free_pages() - prefix) * runner.page_size
        runner.add(0, [0, 1])  # warm-up: every function the loop calls runs once
        runner.step({0: 2})
        runner.remove(0)
        self.loop = EngineLoop(runner, max_batch, c.prefill_chunk, prefix, c.static,
                               self.metrics)
        self.metrics.update(self.loop)  # the gauges count from the start
        self.loop.start()
        self.ready.set()

    def load_in_background(self, on_failure):
        def target():
            try:
                self.load()
            except Exception as e:  # reported, and the process exits (on_failure)
                self.failed = f"{type(e).__name__}: {e}"
                log.error("the engine could not start: %s", self.failed)
                on_failure()

        threading.Thread(target=target, name="load", daemon=True).start()

    def job(self, prompt: list[int], params: dict, emit) -> Job:
        """A job for the loop, once the request fits the engine's context and cache."""
        if not self.ready.is_set():
            raise APIError(503, "the engine is still loading", kind="server_error",
                           headers={"Retry-After": "5"})
        if len(prompt) >= self.max_context:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; the context "
                                f"holds {self.max_context}, and one more must fit",
                           "messages")
        room = self.max_context - len(prompt)
        max_tokens = params["max_tokens"] or room
        if max_tokens > room:
            raise APIError(400, f"max_tokens {max_tokens} and the prompt's "
                                f"{len(prompt)} tokens exceed the context of "
                                f"{self.max_context}", "max_tokens")
        if len(prompt) + max_tokens > self.capacity:
            raise APIError(400, f"the prompt and max_tokens need "
                                f"{len(prompt) + max_tokens} tokens of KV cache; it "
                                f"holds {self.capacity}", "max_tokens")
        if self.loop.queued >= self.config.max_waiting:
            raise APIError(503, f"{self.loop.queued} requests are waiting; try again "
                                "later", kind="server_overloaded",
                           headers={"Retry-After": "1"})
        tok = self.bundle.tokenizer
        decode = ((lambda ids: tok.decode(ids, skip_special_tokens=True)) if tok
                  else self.bundle.detokenize)
        sample = Sampler(params["temperature"], params["top_k"], params["top_p"],
                         params["seed"])
        eos = None if params["ignore_eos"] else self.bundle.eos_token_id
        return Job(prompt, max_tokens, sample, TextStream(decode, params["stop"]),
                   emit, eos)


def create_app(server: Server, served_name: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        yield
        if server.loop:  # after uvicorn's graceful shutdown: no request is left
            server.loop.stop()

    app = FastAPI(title="llmbook", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def refused(request: Request, e: APIError):
        log.warning("%d %s %s: %s", e.status, request.method, request.url.path, e)
        server.metrics.requests.labels(str(e.status)).inc()
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # unknown paths, methods
        routes = ("POST /v1/chat/completions, POST /v1/completions, GET /v1/models, "
                  "GET /health, GET /metrics")
        message = (f"{e.detail}: {request.method} {request.url.path}; this server has "
                   f"{routes}")
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return await refused(request, APIError(e.status_code, message, kind=kind))

    async def read(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        if "model" not in body:
            raise APIError(400, "'model' is required", "model")
        if body["model"] != served_name:
            raise APIError(404, f"the model '{body['model']}' does not exist; this "
                                f"server serves '{served_name}'", "model",
                           kind="not_found_error")
        return body

    @app.get("/health")
    async def health():
        if server.ready.is_set():
            return {"status": "ok"}
        status = "failed: " + server.failed if server.failed else "loading"
        return JSONResponse({"status": status}, 503)

    @app.get("/v1/models")
    async def models():  # once ready, as vLLM's: a client that polls it may then send
        if not server.ready.is_set():
            return await health()
        return {"object": "list", "data": [{
            "id": served_name, "object": "model", "created": 0, "owned_by": "llmbook",
            "max_model_len": server.max_context or None}]}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(server.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    async def answer(body: dict, prompt: list[int], chat: bool):
        params = sampling(body)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(event: dict):  # from the engine's thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = server.job(prompt, params, emit)
        server.loop.submit(job)
        kind = "chat.completion" if chat else "text_completion"

        def log_end(how: str):  # one line per request, as uvicorn's access log would
            log.info("%s %s: %d prompt tokens (%d cached), %d generated, %.2f s", how,
                     kind, len(job.prompt), job.cached_tokens, len(job.tokens),
                     time.perf_counter() - job.arrived)

        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = {"id": rid, "created": int(time.time()), "model": served_name}

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None,
                        "finish_reason": finish}
            delta = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None,
                    "finish_reason": finish}

        if not params["stream"]:
            parts, done = [], None
            try:
                while done is None:
                    event = await events.get()
                    parts.append(event.get("text", ""))
                    if "error" in event:
                        raise APIError(500, event["error"], kind="server_error")
                    if "done" in event:
                        done = event
            finally:
                if done is None:
                    server.loop.cancel(job)
            server.metrics.requests.labels("200").inc()
            log_end(f"200 {done['done']}")
            text = "".join(parts)
            message = ({"message": {"role": "assistant", "content": text}} if chat
                       else {"text": text})
            return head | {"object": kind, "usage": done["usage"], "choices": [
                {"index": 0, **message, "logprobs": None,
                 "finish_reason": done["done"]}]}

        async def stream():
            finished = False
            chunk = head | {"object": kind + (".chunk" if chat else "")}
            try:
                first = chat
                while True:
                    event = await events.get()
                    if first:  # the role comes with the first token, as vLLM sends it:
                        # a load generator times its first chunk as the first token
                        first = False
                        yield sse(chunk | {"choices": [choice("", None, first=True)]})
                    if "text" in event:
                        yield sse(chunk | {"choices": [choice(event["text"], None)]})
                    elif "error" in event:
                        finished = True
                        yield sse({"error": {"message": event["error"],
                                             "type": "server_error"}})
                        break
                    else:
                        finished = True
                        yield sse(chunk | {"choices": [choice(None, event["done"])]})
                        if params["include_usage"]:
                            yield sse(chunk | {"choices": [], "usage": event["usage"]})
                        break
                yield "data: [DONE]\n\n"
                server.metrics.requests.labels("200").inc()
                log_end("200 streamed")
            finally:  # the client went away: its sequence leaves the batch
                if not finished:
                    server.loop.cancel(job)
                    log_end("client gone,")

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read(request)
        return await answer(body, chat_prompt(server.bundle.tokenizer, body), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read(request)
        vocab = server.bundle.config.vocab_size
        prompt = completion_prompt(server.bundle.tokenizer, body, vocab)
        return await answer(body, prompt, chat=False)

    return app


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def run(bundle, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
        served_name: str | None = None, shutdown_timeout: float = 30.0) -> int:
    """Serve until SIGTERM or Ctrl-C: uvicorn stops taking connections, lets the
    requests in flight finish for up to `shutdown_timeout` seconds (then cancels
    them), and the engine loop stops. 0, or 1 when the engine could not start."""
    import signal

    import uvicorn

    class Uvicorn(uvicorn.Server):
        @contextmanager
        def capture_signals(self):
            # uvicorn's own raises the signal again once it has shut down, so the
            # process would end "killed by SIGTERM"; one that stopped as asked exits 0
            signals = (signal.SIGINT, signal.SIGTERM)
            before = {s: signal.signal(s, self.handle_exit) for s in signals}
            try:
                yield
            finally:
                for s, handler in before.items():
                    signal.signal(s, handler)

    server = Server(bundle, config)
    app = create_app(server, served_name or bundle.name)
    # each request logs its own line (above): uvicorn's access log would be a second
    http = Uvicorn(uvicorn.Config(app, host=host, port=port, log_level="info",
                                  access_log=False,
                                  timeout_graceful_shutdown=shutdown_timeout))

    def give_up():
        http.should_exit = True

    server.load_in_background(give_up)
    http.run()
    return 1 if server.failed else 0
