"""
Serve a trained model over HTTP: the ChatGPT-like page, the page's streaming endpoint, and an
OpenAI-compatible API, with one model replica (worker) per GPU. Each replica decodes up to
--max-batch requests together, one forward pass per token for all of them (the Engine's
continuous batching): a new request joins the running batch at the next step, a finished or
hung-up one leaves it at once.

    python -m scripts.chat_web                                    # most advanced stage: rl > sft > mid > base
    python -m scripts.chat_web --source sft --model-tag d20 --step 700 --port 8000
    python -m scripts.chat_web --num-gpus 4 --host 0.0.0.0 --api-key "$KEY"

Endpoints:
    GET  /                      the chat page (nanochat/ui.html)
    POST /chat/completions      the page's stream: data: {"token", "kind": text|python|output} ... data: {"done": true}
    POST /v1/chat/completions   OpenAI chat completions, streaming (SSE) or not; n must be 1
    GET  /v1/models             the loaded model, e.g. nanochat-sft-d20-step700
    GET  /health, GET /stats    liveness; slots in use, requests waiting, tokens generated, tokens/s,
                                time to first token p50/p95

Errors are in OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 invalid JSON or a
limit (message length, context length, n != 1, role order), 401 wrong or missing API key (/v1
routes, with --api-key), 404 unknown route or model, 413 body over --max-body-bytes, 422 a field
of the wrong type or out of range, 429 the wait queue is full (--max-queue), 503 no worker came
free within --queue-timeout (a request waits when every slot of every replica is decoding, or
when its client already holds --max-slots-per-client slots: one client, by address, cannot take
every slot while others wait). Sampling honours temperature, top_p (nucleus) and top_k (accepted as
an extension field). A request without max_tokens gets --max-tokens cut to the room the prompt
leaves in the model's context; a max_tokens that cannot fit is a 400 (context_length_exceeded), as
at OpenAI. In /v1 content, tool calls appear as the
special tokens that delimit them (<|python_start|>1+1<|python_end|><|output_start|>2<|output_end|>).

The app is built by create_app() from loaded models (tests build it in process); main() parses
the flags, loads the replicas and runs uvicorn.

Not for: serving the public internet without a proxy in front (the page and its endpoint are not
behind --api-key).
"""

import asyncio
import json
import os
import random
import sys
import threading
import time
import uuid
from collections import deque
from contextlib import nullcontext
from typing import Literal

import psutil
import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.checkpoint_manager import STAGE_DIRS, find_default_source, load_model
from nanochat.common import ArgumentParser, autodetect_device_type, autodetect_dtype, compute_init, print0
from nanochat.engine import Engine, TokenDecoder, kv_cache_bytes

# Limits on one request; each error message states the number
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MAX_TOP_K = 200
MAX_NEW_TOKENS = 4096
MAX_STOP_SEQUENCES = 4

# The page served at /
UI_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")


def parse_args(argv=None):
    """The command line (default: sys.argv) -> argparse.Namespace; exits with a message when a
    sampling default is out of range."""
    parser = ArgumentParser(description="Chat with a trained model in the browser, or through an OpenAI-compatible API")
    parser.add_argument("--source", default=None, choices=list(STAGE_DIRS), help="default: the most advanced stage with a checkpoint (rl > sft > mid > base)")
    parser.add_argument("--model-tag", default=None, help="default: the largest tag of the source")
    parser.add_argument("--step", type=int, default=None, help="default: the last step")
    parser.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"], help="default: autodetect")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default: bfloat16 on CUDA sm80+, else float32")
    parser.add_argument("--num-gpus", type=int, default=1, help="model replicas, one per GPU (CPU/MPS: always 1)")
    parser.add_argument("--temperature", type=float, default=0.6, help="default sampling temperature (0..2)")
    parser.add_argument("--top-k", type=int, default=50, help=f"default top-k (1..{MAX_TOP_K})")
    parser.add_argument("--max-tokens", type=int, default=512, help="default tokens per reply, cut to what fits the context")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 serves every interface")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("NANOCHAT_API_KEY"), help="Bearer key the /v1 routes require (default: $NANOCHAT_API_KEY, or none)")
    parser.add_argument("--queue-timeout", type=float, default=30.0, help="seconds a request waits for a free worker before a 503")
    parser.add_argument("--max-batch", type=int, default=None, help="requests each replica decodes together (default: the "
                        "KV-cache slots that fit half the free GPU memory, at most 64; on CPU a quarter of free RAM, at most 16)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step, one trace per batch size "
                        "rounded up to a power of two (CUDA graphs on CUDA; not measured on a GPU yet). Not for CPUs: "
                        "there it decoded 40x slower (bench/RESULTS.md). Falls back to eager decoding, with a message, if "
                        "compiling fails")
    parser.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a worker before new ones get a 429")
    parser.add_argument("--max-slots-per-client", type=int, default=None, help="slots one client address may decode in at "
                        "once; its other requests wait in line, passed by other clients' (default: all slots but a quarter, "
                        "at least one kept for others; 0: no limit). The address is X-Forwarded-For's when the request "
                        "comes from 127.0.0.1 (a proxy on this machine), else the peer's")
    parser.add_argument("--stream-interval", type=float, default=0.05, help="seconds a stream waits between chunks "
                        "after the first token (the last one never waits): the tokens sampled meanwhile go out as one "
                        "chunk, at most 20 chunks a second by default, which cuts the server's and the clients' work per "
                        "token (+17%% tokens/s at 8 clients on a 2-core CPU, bench/RESULTS.md). 0: every token as soon as "
                        "it is ready")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get a 413")
    args = parser.parse_args(argv)
    if args.max_batch is not None and args.max_batch < 1:
        sys.exit(f"chat_web: --max-batch must be >= 1, got {args.max_batch}")
    if not 0 <= args.stream_interval <= 1:
        sys.exit(f"chat_web: --stream-interval must be in 0..1 seconds, got {args.stream_interval}")
    if args.max_slots_per_client is not None and args.max_slots_per_client < 0:
        sys.exit(f"chat_web: --max-slots-per-client must be >= 0 (0: no limit), got {args.max_slots_per_client}")
    if not 0 <= args.temperature <= 2 or not 1 <= args.top_k <= MAX_TOP_K or not 1 <= args.max_tokens <= MAX_NEW_TOKENS:
        sys.exit(f"chat_web: --temperature must be in 0..2, --top-k in 1..{MAX_TOP_K}, --max-tokens in 1..{MAX_NEW_TOKENS}")
    return args


# -----------------------------------------------------------------------------
# Errors in OpenAI's shape

ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error a client gets as HTTP `status` with body {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status, message, param=None, code=None):
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param, "code": code}}


# -----------------------------------------------------------------------------
# Workers: a fair FIFO of requests waiting for a free replica

class Worker:
    """One model replica on one device. A thread of its own (the model is synchronous) runs the
    replica's Engine: up to max_batch requests are decoded together, one forward pass per token
    for all of them (continuous batching: requests join and leave between steps).

    submit() hands it a Generation (event loop thread); the thread adds it to the engine, streams
    its tokens back (deliver(), once per step), and ends it (the slot goes back to the pool) after
    a stop token, max_tokens, a cancel, or an error of the model (which ends every request in
    that batch: the engine is reset and the replica serves on). Counters (tokens_generated, busy_seconds) are written by
    the thread only.
    """

    def __init__(self, index, model, tokenizer, dtype, max_batch, compile_decode=False):
        self.index, self.device, self.dtype = index, model.lm_head.weight.device, dtype
        self.engine = Engine(model, tokenizer, max_batch=max_batch, compile_decode=compile_decode)
        self.active = 0  # requests holding one of its slots (changed on the event loop's thread)
        self.requests_served = 0
        self.tokens_generated, self.busy_seconds = 0, 0.0
        self.inbox = []
        self.wakeup = threading.Condition()
        self.thread = None  # started by the first submit()

    @property
    def max_batch(self):
        return self.engine.max_batch

    def autocast(self):
        """A fresh autocast context (one per step: contexts keep state while entered)."""
        return torch.amp.autocast(device_type=self.device.type, dtype=self.dtype) if self.dtype != torch.float32 else nullcontext()

    def submit(self, generation):
        with self.wakeup:
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, daemon=True, name=f"nanochat-worker-{self.index}")
                self.thread.start()
            self.inbox.append(generation)
            self.wakeup.notify()

    def _run(self):
        if self.device.type == "cuda":
            # the current CUDA device is per thread and starts at GPU 0: without this, what
            # names no device (torch.cuda.* calls, new streams, empty_cache) lands on GPU 0
            torch.cuda.set_device(self.device)
        generations = {}  # id(sequence) -> its Generation
        while True:
            with self.wakeup:
                while not self.inbox and not self.engine.has_work():
                    self.wakeup.wait()
                new, self.inbox = self.inbox, []
            out = []  # (generation, token | Generation.END | exception): handed to the event loop in one call per step
            for generation in new:
                try:
                    generation.seq = self.engine.add(generation.prompt, generation.max_tokens, **generation.sampling_params)[0]
                except ValueError as e:
                    out.append((generation, e))
                    continue
                if generation.stopped:  # cancelled before it got here
                    generation.seq.cancel()
                generations[id(generation.seq)] = generation
            t0 = time.perf_counter()
            try:
                with self.autocast():
                    events = self.engine.step()
            except Exception as e:  # a failure of the model belongs to these requests, not to the server
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                print0(f"worker {self.index}: generation failed: {type(e).__name__}: {e}")
                out += [(generations.pop(id(seq)), e) for seq in self.engine.reset()]
                deliver(out)
                continue
            out += [(generations[id(seq)], token) for seq, token, _ in events]
            self.tokens_generated += len(events)
            self.busy_seconds += time.perf_counter() - t0
            for key in [key for key, generation in generations.items() if generation.seq.finished]:
                out.append((generations.pop(key), Generation.END))
            deliver(out)


def deliver(out):
    """(worker thread) Hand a step's tokens and endings to the event loop in one wake-up (one per
    token made the loop's thread fight the worker for the GIL once per token)."""
    if not out:
        return
    def receive():
        for generation, item in out:
            generation.receive(item)
    try:
        out[0][0].loop.call_soon_threadsafe(receive)
    except RuntimeError:  # the event loop closed (server shutting down)
        for generation, _ in out:
            generation.cancel()


def default_max_batch(model, device, dtype):
    """Requests a replica decodes together by default: as many KV-cache slots of a full context
    as fit in half the free GPU memory (a quarter of the available RAM on CPU/MPS), at most 64
    on CUDA and 16 elsewhere (a CPU's matmuls are compute-bound well before that), at least 1.
    Returns (max_batch, bytes per slot)."""
    per_slot = kv_cache_bytes(model.config, 1, dtype)
    if device.type == "cuda":
        budget, cap = torch.cuda.mem_get_info(device)[0] // 2, 64
    else:
        budget, cap = psutil.virtual_memory().available // 4, 16
    return max(1, min(cap, budget // per_slot)), per_slot


def default_max_slots_per_client(slots):
    """All `slots` but a quarter (at least one) for other clients: 16 -> 12, 4 -> 3, 2 -> 1, 1 -> 1."""
    return slots if slots == 1 else slots - max(1, slots // 4)


class WorkerPool:
    """Hands out free slots of the workers (the least busy worker first), first come, first
    served among the clients (by address) under their limit, and counts what they did (for /stats).

    A request waits in line when every slot is taken, or when its client already holds
    `max_slots_per_client` (0: no limit); a freed slot goes to the oldest waiter whose client is
    under its limit, so one client's backlog cannot keep others out. At most `max_queue` may
    wait (else 429), with a limit on, at most half of them from one client (else 429), each for
    up to `queue_timeout` seconds (else 503). Methods run on the event
    loop's thread.
    """

    def __init__(self, workers, max_queue, queue_timeout, max_slots_per_client=0):
        self.workers = workers
        self.waiters = deque()  # (future, client) of requests waiting in line, oldest first
        self.max_queue, self.queue_timeout = max_queue, queue_timeout
        self.max_slots_per_client = max_slots_per_client
        self.held = {}  # client -> slots it decodes in now
        self.stats = {"requests_served": 0, "errors": 0}
        self.ttft = deque(maxlen=1000)  # seconds from arrival to the first token, the latest requests

    def _under_limit(self, client):
        return not self.max_slots_per_client or self.held.get(client, 0) < self.max_slots_per_client

    def _take_slot(self, client):
        worker = min(self.workers, key=lambda w: (w.active / w.max_batch, w.index))
        if worker.active >= worker.max_batch:
            return None
        worker.active += 1
        self.held[client] = self.held.get(client, 0) + 1
        return worker

    async def acquire(self, client):
        """Take a slot for `client` (its address); returns its worker. A free slot means nobody
        in line may take it (see release), so a client under its limit takes it at once.

        Raises:
            APIError 429 (line full) or 503 (waited queue_timeout s).
        """
        if self._under_limit(client) and (worker := self._take_slot(client)):
            return worker
        slots = sum(w.max_batch for w in self.workers)
        if len(self.waiters) >= self.max_queue:
            raise APIError(429, f"the server is busy: {len(self.waiters)} requests waiting for its {slots} slot(s) "
                                f"(--max-queue {self.max_queue}); retry later", code="queue_full")
        own = sum(waiter == client for _, waiter in self.waiters)
        if self.max_slots_per_client and own >= max(1, self.max_queue // 2):  # nor half the line
            raise APIError(429, f"this client ({client}) has {own} request(s) waiting already, half the line "
                                f"(--max-queue {self.max_queue}); retry later", code="queue_full")
        handed = asyncio.get_running_loop().create_future()
        self.waiters.append((handed, client))
        try:
            return await asyncio.wait_for(asyncio.shield(handed), self.queue_timeout)
        except BaseException as e:
            if handed.done() and not handed.cancelled():  # a slot arrived just as we gave up: pass it on
                self.release(handed.result(), client)
            else:
                handed.cancel()
                self.waiters.remove((handed, client))
            if isinstance(e, asyncio.TimeoutError):
                if not self._under_limit(client):
                    why = f"this client ({client}) decodes in {self.held[client]} slot(s) already, its limit (--max-slots-per-client)"
                else:
                    why = f"{slots} slot(s) on {len(self.workers)} worker(s), all busy"
                raise APIError(503, f"no slot came free within {self.queue_timeout:g} s ({why}); retry later",
                               code="queue_timeout") from None
            raise

    def release(self, worker, client):
        """Free `client`'s slot of `worker`; the oldest waiting request whose client is under its
        limit gets a slot, if there is one."""
        worker.active -= 1
        self.held[client] -= 1
        if not self.held[client]:
            del self.held[client]
        for i, (handed, waiter) in enumerate(self.waiters):
            if not handed.done() and self._under_limit(waiter):
                del self.waiters[i]
                handed.set_result(self._take_slot(waiter))
                return


class Generation:
    """One reply, decoded by a worker in its batch; token ids come back through an asyncio queue.

    It starts at once (worker.submit); the worker's deliver() passes each token, then the end,
    to receive() on the event loop, which gives the slot back to `pool` at the end. cancel() (the
    client went away, or a stop string matched) takes it out of the batch at the worker's next step.
    """

    END = object()

    def __init__(self, pool, worker, client, prompt, max_tokens, sampling_params, arrived=None):
        self.loop = asyncio.get_running_loop()
        self.pool, self.worker, self.client = pool, worker, client
        self.prompt, self.max_tokens, self.sampling_params = prompt, max_tokens, sampling_params
        self.arrived = time.perf_counter() if arrived is None else arrived
        self.queue = asyncio.Queue()
        self.ended = asyncio.Event()  # set when the end (END or an exception) is in the queue
        self.stopped = False
        self.seq = None  # the engine's Sequence, once the worker took it
        worker.submit(self)

    def receive(self, item):
        """(event loop) A token, or the end (END or the exception that ended it: the slot goes back)."""
        if isinstance(item, int):
            if not self.stopped:
                self.queue.put_nowait(item)
            return
        self.queue.put_nowait(item)
        self.ended.set()
        self.worker.requests_served += 1
        self.pool.release(self.worker, self.client)

    def cancel(self):
        self.stopped = True
        if self.seq is not None:
            self.seq.cancel()

    async def token_runs(self, interval=0.0):
        """Yield the sampled token ids in runs: each run is every token that arrived since the
        last one was taken (a list of at least one; a stop token, if sampled, ends the last run).

        The first token goes out alone, as soon as it is sampled. After a run, the next one waits
        until `interval` seconds (chat_web --stream-interval) have passed, or the reply has
        ended, whichever is first, and then takes every token that is ready: one chunk per
        interval instead of one per token (a JSON chunk, an h11 event and a socket write on the
        server, a parse on the client, per chunk). With interval 0, a client that keeps up gets
        one token per run, and only an event loop that falls behind the worker (many streams on
        few cores) sends several tokens at once.

        Raises:
            APIError 500: the model raised; the message names the exception.
        """
        first, last = True, 0.0
        try:
            while True:
                if (wait := last + interval - time.perf_counter()) > 0 and not self.ended.is_set():
                    try:  # the end (or an error) does not wait out the interval
                        await asyncio.wait_for(self.ended.wait(), wait)
                    except asyncio.TimeoutError:
                        pass
                items = [await self.queue.get()]
                while not self.queue.empty():
                    items.append(self.queue.get_nowait())
                run = [item for item in items if isinstance(item, int)]  # the end, if here, is the last item
                if run:
                    if first:
                        self.pool.ttft.append(time.perf_counter() - self.arrived)
                        first = False
                    yield run
                    last = time.perf_counter()
                if isinstance(items[-1], Exception):
                    self.pool.stats["errors"] += 1
                    error = items[-1]
                    raise APIError(500, f"generation failed: {type(error).__name__}: {error}", code="generation_failed")
                if items[-1] is self.END:
                    return
        finally:
            self.cancel()


class StopMatcher:
    """Ends a text stream at the first of some stop strings, which is not emitted.

    push(text) -> (text safe to emit now, stopped). Text that could be the start of a stop string
    is held back until the next piece decides it.
    """

    def __init__(self, stops):
        self.stops, self.held = stops, ""

    def push(self, text):
        text = self.held + text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[:min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self):
        text, self.held = self.held, ""
        return text


# -----------------------------------------------------------------------------
# Requests

class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class APIMessage(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]


class StreamOptions(StrictModel):
    include_usage: bool = False


class ChatCompletionRequest(StrictModel):
    """POST /v1/chat/completions (fields OpenAI documents that we do not use are ignored)."""
    model: str | None = None
    messages: list[APIMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=1, le=MAX_TOP_K)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    stop: str | list[str] | None = None
    n: int | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class UIPart(StrictModel):
    type: Literal["text", "python", "python_output"]
    text: str


class UIMessage(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[UIPart]


class UIChatRequest(StrictModel):
    """POST /chat/completions, the page's endpoint: assistant turns may carry their tool parts."""
    messages: list[UIMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    temperature: float | None = Field(None, ge=0, le=2)
    top_k: int | None = Field(None, ge=1, le=MAX_TOP_K)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    seed: int | None = Field(None, ge=0, lt=2**63)


def render_prompt(messages, max_tokens, tokenizer, sequence_len, default_max_tokens):
    """Validated messages -> (prompt token ids, tokens to generate), checking the request limits.

    max_tokens None (the request left it out) means default_max_tokens (--max-tokens) cut to
    the room the prompt leaves in the model's context of sequence_len tokens; a max_tokens the
    request gives must fit (OpenAI answers the same 400).

    Raises:
        APIError 400: a message or the total too long, the wrong role order, or the prompt plus
            max_tokens past the model's context; the message gives the numbers.
    """
    conversation = {"messages": [m.model_dump() for m in messages]}
    total = 0
    for i, m in enumerate(messages):
        chars = len(m.content) if isinstance(m.content, str) else sum(len(p.text) for p in m.content)
        if chars > MAX_MESSAGE_CHARS:
            raise APIError(400, f"messages[{i}] has {chars} characters; the limit is {MAX_MESSAGE_CHARS} per message", param=f"messages.{i}.content", code="message_too_long")
        total += chars
    if total > MAX_TOTAL_CHARS:
        raise APIError(400, f"the messages have {total} characters in total; the limit is {MAX_TOTAL_CHARS}", param="messages", code="messages_too_long")
    if messages[-1].role != "user":
        raise APIError(400, f"the last message must be from the user (it is from the {messages[-1].role}): the model writes the assistant's reply to it", param="messages")
    try:
        tokens = tokenizer.render_for_completion(conversation)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    room = sequence_len - len(tokens)
    if room < 1:
        raise APIError(400, f"the prompt is {len(tokens)} tokens, which fills the model's context of {sequence_len} tokens; "
                            "shorten the conversation", param="messages", code="context_length_exceeded")
    if max_tokens is None:
        return tokens, min(default_max_tokens, room)
    if max_tokens > room:
        raise APIError(400, f"the prompt is {len(tokens)} tokens and max_tokens is {max_tokens}: {len(tokens) + max_tokens} > the model's "
                            f"context of {sequence_len} tokens; send max_tokens <= {room}, or leave it out to use the room left",
                       param="max_tokens", code="context_length_exceeded")
    return tokens, max_tokens


def sampling(body, args):
    """Engine.generate's temperature, top_k, top_p and seed for a request: the server's defaults
    (args: --temperature, --top-k) where the request gives none, and a fresh random seed unless
    it gives one."""
    return {"temperature": args.temperature if body.temperature is None else body.temperature,
            "top_k": args.top_k if body.top_k is None else body.top_k,
            "top_p": getattr(body, "top_p", None),
            "seed": random.randrange(2**31) if body.seed is None else body.seed}


def client_address(request):
    """Who a request is from, for --max-slots-per-client: the peer's IP address, or the
    X-Forwarded-For one that uvicorn takes from a proxy at 127.0.0.1 (its default forwarded_allow_ips)."""
    return request.client.host if request.client else "unknown"


def sse(payload):
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# -----------------------------------------------------------------------------
# The app

class BodySizeLimit:
    """ASGI middleware: answer 413 to a request body over `max_bytes` (by Content-Length, or by
    counting a chunked body), before any route reads it."""

    def __init__(self, app, max_bytes):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self.reject(int(declared), send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self.reject(size, send)
            more = message.get("more_body", False)
        body = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():  # the body once, then the client's later messages (its disconnect)
            return body.pop() if body else await receive()
        await self.app(scope, replay, send)

    async def reject(self, size, send):
        response = JSONResponse(error_body(413, f"the request body is {size} bytes or more; the limit is {self.max_bytes} bytes "
                                                "(--max-body-bytes)", code="request_too_large"), status_code=413)
        await response({"type": "http"}, None, send)


# Every error in OpenAI's shape (create_app installs these handlers)

async def handle_api_error(request, e):
    return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status)


async def handle_validation_error(request, e):
    errors = e.errors()
    if any(err["type"] == "json_invalid" for err in errors):
        detail = errors[0].get("ctx", {}).get("error", "")
        return JSONResponse(error_body(400, f"the request body is not valid JSON ({detail})", code="invalid_json"), status_code=400)
    def where(err):
        return ".".join(str(p) for p in err["loc"] if p != "body") or "body"
    message = "; ".join(f"{where(err)}: {err['msg']}" for err in errors[:5])
    return JSONResponse(error_body(422, f"invalid request: {message}", param=where(errors[0]), code="invalid_value"), status_code=422)


async def handle_http_error(request, e):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return JSONResponse(error_body(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code), status_code=e.status_code)


async def handle_unexpected_error(request, e):
    print0(f"{request.method} {request.url.path}: {type(e).__name__}: {e}")
    return JSONResponse(error_body(500, f"internal error: {type(e).__name__}: {e}"), status_code=500)


def create_app(models, tokenizer, model_id, args, dtype=torch.float32):
    """The FastAPI app serving `models` (replicas of one checkpoint, one per device) as `model_id`.

    args: parse_args()'s flags; the app reads --temperature, --top-k, --max-tokens, --api-key, --compile,
    --queue-timeout, --max-queue, --max-slots-per-client and --max-body-bytes. Everything a request touches lives in here,
    so apps can be built side by side in one process (the tests drive them with TestClient).
    """
    max_batch = args.max_batch or default_max_batch(models[0], models[0].lm_head.weight.device, dtype)[0]
    per_client = args.max_slots_per_client
    if per_client is None:
        per_client = default_max_slots_per_client(max_batch * len(models))
    pool = WorkerPool([Worker(i, model, tokenizer, dtype, max_batch, args.compile) for i, model in enumerate(models)],
                      args.max_queue, args.queue_timeout, per_client)
    sequence_len = models[0].config.sequence_len
    stop_tokens = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    loaded_at = int(time.time())
    with open(UI_PATH, encoding="utf-8") as f:
        ui_html = f.read()

    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None)
    app.add_middleware(BodySizeLimit, max_bytes=args.max_body_bytes)
    app.add_exception_handler(APIError, handle_api_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_error)
    app.add_exception_handler(Exception, handle_unexpected_error)

    async def check_api_key(request: Request):
        """Dependency of the /v1 routes: with --api-key, require `Authorization: Bearer <key>` (401 otherwise)."""
        if args.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or key.strip() != args.api_key:
            raise APIError(401, "Incorrect or missing API key: send the header `Authorization: Bearer <key>` with the key this "
                                "server was started with (--api-key)", code="invalid_api_key")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return ui_html

    @app.get("/health")
    async def health():
        # defaults: what a request that leaves them out gets; the page starts its sliders there
        return {"status": "ok", "ready": True, "workers": len(pool.workers), "model": model_id,
                "defaults": {"temperature": args.temperature, "top_k": args.top_k, "max_tokens": args.max_tokens}}

    @app.get("/stats")
    async def get_stats():
        workers = pool.workers
        tokens, busy = sum(w.tokens_generated for w in workers), sum(w.busy_seconds for w in workers)
        ttft = sorted(pool.ttft)
        def percentile(q):  # nearest rank
            return round(ttft[min(len(ttft) - 1, int(q * len(ttft)))], 4) if ttft else None
        return {
            "model": model_id,
            "workers": {"total": len(workers), "busy": sum(w.active > 0 for w in workers),
                        "free": sum(w.active == 0 for w in workers)},
            "slots": {"total": sum(w.max_batch for w in workers), "active": sum(w.active for w in workers)},
            "active_sequences": sum(w.active for w in workers),
            "waiting": len(pool.waiters),
            "clients": len(pool.held),  # addresses decoding now
            "max_slots_per_client": pool.max_slots_per_client,
            "requests_served": pool.stats["requests_served"],
            "tokens_generated": tokens,
            # while at least one request was decoding: the aggregate rate over every sequence in the batch
            "tokens_per_second": round(tokens / busy, 1) if busy else 0.0,
            "ttft_seconds": {"p50": percentile(0.50), "p95": percentile(0.95), "requests": len(ttft)},
            "errors": pool.stats["errors"],
            "per_worker": [{"index": w.index, "device": str(w.device), "active": w.active, "max_batch": w.max_batch,
                            "requests_served": w.requests_served,
                            # --compile: "compiled" until compiling fails (then "eager", with the reason in the log)
                            "decode": "eager" if w.engine.compiled_decode is None else "compiled"} for w in workers],
        }

    @app.get("/v1/models", dependencies=[Depends(check_api_key)])
    async def list_models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": loaded_at, "owned_by": "nanochat"}]}

    @app.post("/chat/completions")
    async def ui_chat_completions(body: UIChatRequest, request: Request):
        arrived = time.perf_counter()
        tokens, max_tokens = render_prompt(body.messages, body.max_tokens, tokenizer, sequence_len, args.max_tokens)
        params = sampling(body, args)
        client = client_address(request)
        worker = await pool.acquire(client)
        generation = Generation(pool, worker, client, tokens, max_tokens, params, arrived)
        pool.stats["requests_served"] += 1

        async def events():
            decoder, count, finish = TokenDecoder(tokenizer), 0, "length"
            try:
                async for run in generation.token_runs(args.stream_interval):
                    pieces = []  # [kind, text]: a run's neighbouring pieces of one kind go out as one event
                    for token in run:
                        count += 1
                        if token in stop_tokens:
                            finish = "stop"
                            break
                        for kind, text in decoder.push(token):
                            if kind == "special":
                                continue
                            if pieces and pieces[-1][0] == kind:
                                pieces[-1][1] += text
                            else:
                                pieces.append([kind, text])
                    for kind, text in pieces:
                        yield sse({"token": text, "kind": kind})
                    if finish == "stop":
                        break
                for kind, text in decoder.flush():
                    yield sse({"token": text, "kind": kind})
                yield sse({"done": True, "finish_reason": finish, "prompt_tokens": len(tokens), "completion_tokens": count})
            except APIError as e:
                yield sse({"error": e.message})

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions", dependencies=[Depends(check_api_key)])
    async def openai_chat_completions(body: ChatCompletionRequest, request: Request):
        arrived = time.perf_counter()
        if body.model not in (None, model_id, "nanochat"):
            raise APIError(404, f"The model {body.model!r} does not exist; this server serves {model_id!r} (GET /v1/models)", param="model", code="model_not_found")
        if body.n not in (None, 1):
            raise APIError(400, f"n={body.n}: this server returns one choice per request; send n=1 (or leave it out)", param="n")
        stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES or not all(stops):
            raise APIError(400, f"stop takes up to {MAX_STOP_SEQUENCES} non-empty strings, got {len(stops)}", param="stop")
        if body.max_tokens is not None and body.max_completion_tokens is not None and body.max_tokens != body.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens disagree; send one of them", param="max_tokens")
        tokens, max_tokens = render_prompt(body.messages, body.max_completion_tokens or body.max_tokens, tokenizer, sequence_len, args.max_tokens)
        params = sampling(body, args)
        client = client_address(request)
        worker = await pool.acquire(client)
        generation = Generation(pool, worker, client, tokens, max_tokens, params, arrived)
        pool.stats["requests_served"] += 1
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = {"prompt_tokens": len(tokens), "completion_tokens": 0, "total_tokens": len(tokens)}

        async def decoded_pieces():
            """The reply's decoded text pieces as tokens are sampled, the decoder's flush last; counts
            usage["completion_tokens"] and sets finish[0] on a stop token."""
            decoder = TokenDecoder(tokenizer)
            async for run in generation.token_runs(args.stream_interval):
                texts = []
                for token in run:
                    usage["completion_tokens"] += 1
                    if token in stop_tokens:
                        finish[0] = "stop"
                        break
                    texts += [text for _, text in decoder.push(token)]
                if texts:
                    yield "".join(texts)
                if finish[0] == "stop":
                    break
            for _, text in decoder.flush():
                yield text

        async def content_pieces():
            """Yield the reply's text as it is sampled, cut at the first stop string (finish[0] = "stop")."""
            matcher = StopMatcher(stops)
            async for text in decoded_pieces():  # the callers cancel the generation when the stream ends
                text, stopped = matcher.push(text)
                if text:
                    yield text
                if stopped:
                    finish[0] = "stop"
                    return
            if tail := matcher.flush():
                yield tail

        finish = ["length"]

        def usage_total():
            return {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}

        if not body.stream:
            content = []
            try:
                async for text in content_pieces():
                    content.append(text)
                    if await request.is_disconnected():
                        break
            finally:
                generation.cancel()
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(content)}, "logprobs": None, "finish_reason": finish[0]}],
                    "usage": usage_total()}

        include_usage = body.stream_options is not None and body.stream_options.include_usage

        def chunk(delta, finish_reason=None):
            payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
                       "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
            if include_usage:
                payload["usage"] = None
            return sse(payload)

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for text in content_pieces():
                    yield chunk({"content": text})
                yield chunk({}, finish[0])
                if include_usage:
                    yield sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
                               "choices": [], "usage": usage_total()})
            except APIError as e:
                yield sse(error_body(e.status, e.message, code=e.code))
            finally:
                generation.cancel()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def main():
    args = parse_args()

    # Model replicas: one per GPU
    try:
        device_type = args.device_type or autodetect_device_type()
        compute_init(device_type)
        source = args.source or find_default_source()
        if device_type == "cuda":
            if not 1 <= args.num_gpus <= torch.cuda.device_count():
                raise ValueError(f"--num-gpus {args.num_gpus}: this machine has {torch.cuda.device_count()} GPU(s)")
            devices = [torch.device("cuda", i) for i in range(args.num_gpus)]
        else:
            devices = [torch.device(device_type)]
        replicas = [load_model(source, devices[0], "eval", model_tag=args.model_tag, step=args.step)]
        model_tag, step = replicas[0][2]["model_tag"], replicas[0][2]["step"]
        replicas += [load_model(source, device, "eval", model_tag=model_tag, step=step) for device in devices[1:]]
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"chat_web: {e}")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype] if args.dtype else autodetect_dtype(device_type)
    models, tokenizer = [model for model, _, _ in replicas], replicas[0][1]
    model_id = f"nanochat-{source}-{model_tag}-step{step}"
    num_params = sum(p.numel() for p in models[0].parameters())
    print0(f"Model {model_id}: {num_params / 1e6:.1f}M params, context {models[0].config.sequence_len} tokens, "
           f"{str(dtype).removeprefix('torch.')} on {', '.join(str(d) for d in devices)}")

    # Serve: as many requests per replica as KV-cache slots fit (--max-batch)
    if args.max_batch is None:
        args.max_batch, per_slot = default_max_batch(models[0], devices[0], dtype)
        print0(f"Decoding up to {args.max_batch} requests together per replica (--max-batch): a KV-cache slot of "
               f"{models[0].config.sequence_len} tokens takes {per_slot / 2**20:.1f} MiB, {args.max_batch * per_slot / 2**30:.2f} GiB in all")
    app = create_app(models, tokenizer, model_id, args, dtype)
    print0(f"nanochat is up: open http://{'localhost' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}/ "
           f"(OpenAI API at /v1{', key required' if args.api_key else ''})")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
