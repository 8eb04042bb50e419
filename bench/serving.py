"""
Serving many clients from one model: a load generator that drives scripts.chat_web on 127.0.0.1
with the official OpenAI client (streaming chat completions) at several numbers of concurrent
clients, and reports aggregate generated tokens/s, per-request tokens/s, time to first token
p50/p95 and errors.

Baseline, measured in the same run: the same server with --max-batch 1, one request decoded at
a time per replica (how chat_web served before continuous batching). Both servers run side by
side and take turns at each client count, and the sweep repeats (--repeats); the ratio column is
the median over repeats of the aggregate tokens/s against the baseline's at the same clients in
the same repeat (a shared CPU's speed drifts by tens of percent over minutes). After each run the
server's /stats must show every slot free and nobody waiting (else the row says NO).

The model: a depth --depth GPT with random weights (tokens/s does not depend on what the weights
are) whose stop tokens are suppressed, so every reply runs exactly --max-tokens tokens (the
ignore_eos of other serving benchmarks); usage.completion_tokens is what gets counted. It is
saved as an sft checkpoint in a scratch base dir next to the tokenizer of $NANOCHAT_BASE_DIR (or
--base-dir; e.g. after `bash speedrun_dgx.sh --tiny --only tokenizer`).

    python -m bench.serving                                   # d4, 1/4/8/16 clients, on this machine's device
    python -m bench.serving --depth 20 --clients 1,8,32,64 --device-type cuda --max-tokens 128
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict

import httpx
import torch

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.common import get_base_dir
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle, and what she does next."


def build_model_dir(base_dir, scratch, depth, sequence_len):
    """A NANOCHAT_BASE_DIR in `scratch` holding base_dir's tokenizer and a random depth-`depth`
    sft checkpoint that never samples <|assistant_end|> or <|bos|>. Returns the model tag."""
    tokenizer_dir = os.path.join(base_dir, "tokenizer")
    if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.pkl")):
        sys.exit(f"bench.serving: no tokenizer in {tokenizer_dir}; run `bash speedrun_dgx.sh --tiny --only tokenizer` "
                 "(or pass --base-dir)")
    shutil.copytree(tokenizer_dir, os.path.join(scratch, "tokenizer"))
    tokenizer = RustBPETokenizer.from_directory(os.path.join(scratch, "tokenizer"))
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(depth, vocab_size=tokenizer.get_vocab_size(), sequence_len=sequence_len))
    model.init_weights()
    with torch.no_grad():  # a large constant feature 0 after the final norm, which the stop tokens' logits read negatively
        model.transformer.wte.weight[:, 0] = 20.0
        for name in ("<|assistant_end|>", "<|bos|>"):
            row = model.lm_head.weight[tokenizer.encode_special(name)]
            row.zero_()
            row[0] = -1.0
    tag = f"d{depth}"
    meta = {"model_config": asdict(model.config), "tokenizer_hash": tokenizer.content_hash()}
    save_checkpoint(os.path.join(scratch, "chatsft_checkpoints", tag), 0, model.state_dict(), None, meta)
    return tag


class ChatWebServer:
    """`python -m scripts.chat_web --host 127.0.0.1 --port <free> *flags` in a subprocess with
    NANOCHAT_BASE_DIR=base_dir (its output in base_dir/server_<port>.log); returns once /health
    answers. .url, .log(), .stop().

    Raises:
        RuntimeError: the server exited, or did not answer within timeout_s; the message holds its output.
    """

    def __init__(self, base_dir, *flags, timeout_s=300):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(base_dir, f"server_{self.port}.log")
        env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONUNBUFFERED": "1"}
        env.pop("NANOCHAT_API_KEY", None)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--host", "127.0.0.1", "--port", str(self.port),
                                          *flags], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chat_web exited early:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"chat_web did not come up in {timeout_s} s:\n{self.log()}")

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def one_request(client, max_tokens, seed):
    """One streaming chat completion. Returns dict(ttft_s, seconds, tokens) or dict(error)."""
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    try:
        stream = client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=max_tokens, temperature=1.0, seed=seed, stream=True,
                                                stream_options={"include_usage": True})
        for chunk in stream:
            if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                ttft = time.perf_counter() - t0
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as e:  # every failure is counted, not raised: the benchmark reports errors
        return {"error": f"{type(e).__name__}: {e}"}
    seconds = time.perf_counter() - t0
    return {"ttft_s": seconds if ttft is None else ttft, "seconds": seconds, "tokens": tokens}


def run_load(url, clients, requests_per_client, max_tokens):
    """`clients` threads, each sending requests_per_client requests one after another.
    Returns the phase's summary dict."""
    from openai import OpenAI
    results = []
    lock = threading.Lock()

    # the clients are made before the clock starts: each loads its TLS settings, ~50 ms of CPU
    openai_clients = [OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) for _ in range(clients)]
    start = threading.Barrier(clients + 1)

    def client_loop(c):
        start.wait()
        for r in range(requests_per_client):
            out = one_request(openai_clients[c], max_tokens, seed=1000 * c + r)
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    ttfts = sorted(r["ttft_s"] for r in ok)

    def percentile(q):
        return ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else float("nan")
    tokens = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok),
            "error_messages": sorted({r["error"] for r in results if "error" in r})[:3],
            "wall_s": wall, "tokens": tokens, "aggregate_tok_s": tokens / wall,
            "per_request_tok_s": statistics.mean(r["tokens"] / r["seconds"] for r in ok) if ok else float("nan"),
            "ttft_p50_s": percentile(0.50), "ttft_p95_s": percentile(0.95)}


def main():
    parser = argparse.ArgumentParser(description="chat_web under concurrent streaming clients: continuous batching vs batch 1")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--sequence-len", type=int, default=2048, help="the model's context (sets the KV-cache slot size)")
    parser.add_argument("--clients", default="1,4,8,16", help="comma list of concurrent clients")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="sweeps over the client counts (medians are reported)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per reply (every reply runs this long)")
    parser.add_argument("--max-batch", type=int, default=None, help="the batched server's --max-batch (default: chat_web's)")
    parser.add_argument("--compile", action="store_true", help="both servers (and the Engine rows) decode through torch.compile")
    parser.add_argument("--stream-interval", type=float, default=None, help="both servers' --stream-interval (default: chat_web's)")
    parser.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"], help="default: chat_web's autodetect")
    parser.add_argument("--base-dir", default=None, help="with tokenizer/ (default: $NANOCHAT_BASE_DIR)")
    parser.add_argument("--out", default=None, help="write every phase as JSON here")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    base_dir = args.base_dir or get_base_dir()

    # every client of the load generator is one address (127.0.0.1): no per-client limit, so that
    # the batch can fill with them as it would with as many people
    flags = ["--max-queue", "1024", "--queue-timeout", "3600", "--max-slots-per-client", "0"]
    if args.device_type:
        flags += ["--device-type", args.device_type]
    if args.compile:
        flags += ["--compile"]
    if args.stream_interval is not None:
        flags += ["--stream-interval", str(args.stream_interval)]
    configs = [("batch 1 (baseline)", ["--max-batch", "1"]),
               ("continuous", [] if args.max_batch is None else ["--max-batch", str(args.max_batch)])]
    runs = []  # every phase of every repeat
    with tempfile.TemporaryDirectory(prefix="nanochat_serving_") as scratch:
        tag = build_model_dir(base_dir, scratch, args.depth, args.sequence_len)
        servers = []
        try:
            for name, server_flags in configs:  # both up at once; the idle one costs nothing
                try:
                    servers.append(ChatWebServer(scratch, "--source", "sft", "--model-tag", tag, *flags, *server_flags))
                except RuntimeError as e:
                    sys.exit(f"bench.serving: {e}")
                one_request_warmup(servers[-1].url, args.max_tokens)
                n = 2
                while args.compile and n <= 2 * max(clients):  # every padded batch size compiles before the clock runs
                    run_load(servers[-1].url, n, 1, 4)
                    n *= 2
            max_batch = [httpx.get(s.url + "/stats").json()["slots"]["total"] for s in servers]
            # the baseline and the batched server take turns at each client count, and the sweep
            # repeats: a machine whose speed drifts over minutes shifts both alike
            for repeat in range(args.repeats):
                for n in clients:
                    for (name, _), server, batch in zip(configs, servers, max_batch):
                        row = {"server": name, "max_batch": batch, "repeat": repeat,
                               **run_load(server.url, n, args.requests_per_client, args.max_tokens)}
                        stats = httpx.get(server.url + "/stats").json()
                        row["slots_free_after"] = stats["slots"]["active"] == 0 and stats["waiting"] == 0
                        runs.append(row)
                        print(f"repeat {repeat} | {name:<20} max_batch {batch:>3} | {n:>3} clients | "
                              f"{row['aggregate_tok_s']:8.1f} tok/s aggregate | {row['per_request_tok_s']:7.1f} tok/s per request | "
                              f"ttft p50 {row['ttft_p50_s']:.3f} s p95 {row['ttft_p95_s']:.3f} s | errors {row['errors']}", flush=True)
                        if args.out:
                            with open(args.out, "w") as f:
                                json.dump(runs, f, indent=1)
        finally:
            for server in servers:
                server.stop()

        engine_rows = measure_engine(scratch, tag, args.device_type, sorted({1, *clients}), args.max_tokens, args.compile)
    print("\nThe Engine alone (no HTTP): Engine.generate_many over 32 prompts:")
    for r in engine_rows:
        print(f"  max_batch {r['max_batch']:>3}: {r['tok_s']:8.1f} tok/s ({r['tok_s'] / engine_rows[0]['tok_s']:.2f}x max_batch 1)")

    rows = summarize(runs, configs[0][0])
    print(f"\nd{args.depth}, {args.max_tokens} tokens per reply, {args.requests_per_client} requests per client, "
          f"median of {args.repeats} repeats; ratio = the median over repeats of aggregate tok/s / the batch-1 server's "
          "at the same clients in the same repeat")
    print("| server | max batch | clients | aggregate tok/s | ratio | per-request tok/s | TTFT p50 s | TTFT p95 s | errors | slots free after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['server']} | {r['max_batch']} | {r['clients']} | {r['aggregate_tok_s']:,.1f} | {r['ratio']:.2f}x | "
              f"{r['per_request_tok_s']:,.1f} | {r['ttft_p50_s']:.3f} | {r['ttft_p95_s']:.3f} | {r['errors']} | "
              f"{'yes' if r['slots_free_after'] else 'NO'} |")


def summarize(runs, baseline_name):
    """One row per (server, clients): medians over the repeats, the ratio against the baseline
    server in the same repeat, errors summed, slots free after every repeat."""
    baseline = {(r["repeat"], r["clients"]): r["aggregate_tok_s"] for r in runs if r["server"] == baseline_name}
    rows = []
    for key in dict.fromkeys((r["server"], r["max_batch"], r["clients"]) for r in runs):
        group = [r for r in runs if (r["server"], r["max_batch"], r["clients"]) == key]
        rows.append({"server": key[0], "max_batch": key[1], "clients": key[2], "repeats": len(group),
                     **{k: statistics.median(r[k] for r in group)
                        for k in ("aggregate_tok_s", "per_request_tok_s", "ttft_p50_s", "ttft_p95_s")},
                     "ratio": statistics.median(r["aggregate_tok_s"] / baseline[(r["repeat"], r["clients"])] for r in group),
                     "errors": sum(r["errors"] for r in group), "slots_free_after": all(r["slots_free_after"] for r in group)})
    return rows


def measure_engine(scratch, tag, device_type, batches, max_tokens, compile_decode=False, num_prompts=32):
    """The same model without HTTP: Engine.generate_many over num_prompts prompts at each
    max_batch (1 = one at a time, how chat_eval decoded before), tokens/s of generated tokens."""
    from nanochat.checkpoint_manager import load_model
    from nanochat.common import autodetect_device_type
    from nanochat.engine import Engine
    os.environ["NANOCHAT_BASE_DIR"] = scratch
    device = device_type or autodetect_device_type()
    model, tokenizer, _ = load_model("sft", device, "eval", model_tag=tag)
    dtype = torch.bfloat16 if device == "cuda" else None
    prompts = [tokenizer.render_for_completion({"messages": [{"role": "user", "content": f"{PROMPT} ({i})"}]})
               for i in range(num_prompts)]
    rows = []
    for max_batch in batches:
        engine = Engine(model, tokenizer, compile_decode=compile_decode)
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            engine.generate_many(prompts[:max(2, max_batch)], max_batch=max_batch, max_tokens=4)  # warm-up (and compile)
            t0 = time.perf_counter()
            outputs = engine.generate_many(prompts, max_batch=max_batch, max_tokens=max_tokens, temperature=1.0, top_k=50)
            if device == "cuda":
                torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        tokens = sum(len(r) - len(p) for p, (results, _) in zip(prompts, outputs) for r in results)
        rows.append({"max_batch": max_batch, "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds})
    return rows


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request_warmup(url, max_tokens):
    """One request before measuring (first-call allocations, lazy thread start)."""
    from openai import OpenAI
    out = one_request(OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600), max_tokens, seed=0)
    if "error" in out:
        sys.exit(f"bench.serving: the warm-up request failed: {out['error']}")


if __name__ == "__main__":
    main()
