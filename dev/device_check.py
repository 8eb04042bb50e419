"""
The GPU device check: prove every stage's CUDA path and measure what a GPU user cares about, in
at most two short calls on a borrowed GPU (no internet, minutes of device time), then write the
results as JSON and as markdown tables ready for bench/RESULTS.md.

Part 1 (what matters most): d20 training throughput at seq 2048 with the device batch the memory
model picks (tok/s, MFU, peak memory predicted vs measured, compile time), then every stage on
the GPU as the pipeline runs it (base_train with torch.compile + bf16 + fused AdamW + Muon, a
resume from its checkpoint, mid_train, chat_sft, chat_rl, chat_eval, the Engine's KV-cache
decode against a full forward, chat_web answering the OpenAI client).
Part 2 (the rest, cheapest first): the memory model's eager grid (d20, batch 4 to 32); decode
tok/s, time to first token and memory-bandwidth use at batch 1, 8, 32 (d20); the SDPA backends;
d12 and d26 throughput; bf16 vs fp8 (d20, d26); torch.compile's max-autotune against the default (d12).
Part 3 (own call): serving (bench/serving.py, chat_web batch 1 vs continuous batching, 1 to 64 clients, d20),
then the Engine's decode step eager vs compiled (CUDA graphs) at batch 1 and 8.

Every item reports pass/fail with its error and is written as soon as it ends, and a time budget
stops starting new items, so a call cut short still returns what it measured. --cpu runs the same
code at CPU sizes (the smoke preset, d2/d4), which tests/test_device_check.py runs so it cannot rot.

    bash dev/device_pack.sh                     # here, once: wheels, data, tokenizer -> .device_pack/
    bash dev/device_check.sh --part 1           # on the device machine (bench/README.md has the call)
    python dev/device_check.py --cpu --out /tmp/check   # here, at CPU sizes; NANOCHAT_BASE_DIR has data

Not for: choosing settings at run time (nanochat/run_shape.py does, from the constants this corrects).
"""

import argparse
import gc
import json
import os
import re
import socket
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a file on a machine where the project is not installed

import torch  # noqa: E402

from bench.memory_model import build_model, cuda_peak_bytes  # noqa: E402
from bench.train_throughput import measure_train_step  # noqa: E402
from nanochat.common import atomic_write, get_memory_bandwidth, get_peak_flops  # noqa: E402
from nanochat.run_shape import PRESETS, predict_peak_memory, run_shape  # noqa: E402

# What each mode measures. GPU: upstream's shapes; CPU: the same code in seconds.
SIZES = {
    "gpu": dict(preset="tiny", part1_depths=[20], part2_depths=[12, 26], seq=2048, vocab=65536, steps=8, warmup=3,
                decode_depth=20, decode_batches=[1, 8, 32], decode_tokens=128, prompt_tokens=512, compile_batches=[1, 8],
                fp8_depths=[20, 26], memory_depth=20, memory_batches=[4, 8, 16, 32], autotune_depth=12,
                sdpa_batch=16, serving_depth=20, serving_clients=[1, 8, 32, 64], serving_tokens=64),
    "cpu": dict(preset="smoke", part1_depths=[2], part2_depths=[4], seq=256, vocab=2048, steps=2, warmup=1,
                decode_depth=2, decode_batches=[1, 4], decode_tokens=8, prompt_tokens=32, compile_batches=[1],
                fp8_depths=[2], memory_depth=2, memory_batches=[2, 4], autotune_depth=None, sdpa_batch=2,
                serving_depth=2, serving_clients=[1, 4], serving_tokens=8),
}
STAGE_TIMEOUT_S = 240
# seconds after which a part starts no new item. The device time (15 minutes) also pays for each
# machine start and idle wait: part 1 fits a `run` call of 450 s, part 2 one of 270 s, part 3
# (serving, one item) one of 330 s.
BUDGET_S = {"1": 300, "2": 150, "3": 300}


class Report:
    """The results, rewritten to out_dir/device_check_part<N>.{json,md} after every item."""

    def __init__(self, out_dir, part, mode, budget_s):
        self.out_dir, self.part, self.budget_s, self.t0 = out_dir, part, budget_s, time.time()
        self.data = {"part": part, "mode": mode, "machine": machine_info(), "checks": [], "train": [], "decode": [],
                     "serving": [], "compiled_decode": [], "sdpa": [], "fp8": [], "memory": [], "settings": {}}
        os.makedirs(out_dir, exist_ok=True)

    def time_left(self):
        return self.budget_s - (time.time() - self.t0)

    def run(self, name, fn, *args):
        """Run fn(*args) as the check `name`: pass/fail with the error's last lines, seconds, and
        whatever dict it returns; skipped when the time budget is spent. Returns fn's result or None."""
        entry = {"name": name, "status": "skipped", "seconds": 0.0, "detail": ""}
        self.data["checks"].append(entry)
        if self.time_left() <= 0:
            entry["detail"] = "out of time (--budget-s)"
            self.write()
            return None
        t0 = time.time()
        print(f"[device_check] {name} ...", flush=True)
        try:
            result = fn(*args)
            entry["status"] = "pass"
            entry["detail"] = result.pop("detail", "") if isinstance(result, dict) else ""
        except Exception as e:  # every item reports its own failure and the check goes on
            result = None
            entry["status"] = "fail"
            entry["detail"] = (str(e) or type(e).__name__)[-1500:]
            traceback.print_exc()
        entry["seconds"] = round(time.time() - t0, 1)
        print(f"[device_check] {name}: {entry['status']} ({entry['seconds']} s) {entry['detail'][:300]}", flush=True)
        free_memory()
        self.write()
        return result

    def write(self):
        stem = os.path.join(self.out_dir, f"device_check_part{self.part}")
        atomic_write(stem + ".json", json.dumps(self.data, indent=2, default=str))
        atomic_write(stem + ".md", to_markdown(self.data))


def machine_info():
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"sm_{props.major}{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1),
                    peak_bf16_flops=get_peak_flops(props.name), peak_bandwidth=get_memory_bandwidth(props.name))
    return info


def free_memory():
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# Part 1: the stages, as the pipeline runs them

def run_script(module, *args, env):
    """Run `python -m module args` in the repo (at most STAGE_TIMEOUT_S); return its stdout, or
    raise with its last output."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=STAGE_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} exited {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}")
    return proc.stdout


def last_loss(stdout):
    """The loss on the last progress line ('step 00006/00006 ... | loss 5.123456 | ...')."""
    losses = re.findall(r"step \d+/\d+ .*?\| loss ([\d.]+)", stdout)
    if not losses:
        raise RuntimeError("no progress line in the output")
    return float(losses[-1])


def stage_flags(stage, preset):
    return [item for name, value in PRESETS[preset][stage].items() for item in (f"--{name}", str(value))]


def check_base_train(env, preset):
    out = run_script("scripts.base_train", "--preset", preset, "--num-iterations", "6", "--save-every", "3",
                     "--eval-every", "3", "--sample-every", "6", env=env)
    mfu = re.findall(r"mfu ([\d.]+%|n/a)", out)
    return {"loss": last_loss(out), "detail": f"loss {last_loss(out):.4f}, last step mfu {mfu[-1] if mfu else '?'}; "
            + " | ".join(line for line in out.splitlines() if line.startswith(("device:", "batch:")))}


def check_resume(env, preset, reference):
    out = run_script("scripts.base_train", "--preset", preset, "--num-iterations", "6", "--save-every", "3",
                     "--eval-every", "3", "--sample-every", "6", "--resume-from-step", "3", env=env)
    diff = abs(last_loss(out) - reference["loss"]) if reference else None
    return {"detail": f"step 6 loss {last_loss(out):.6f} after resuming at step 3; "
            + (f"|difference| to the uninterrupted run {diff:.2e}" if diff is not None else "no reference run")}


def check_engine(env):
    """The Engine's KV-cache greedy decode gives the tokens of the cache-less full forward."""
    os.environ["NANOCHAT_BASE_DIR"] = env["NANOCHAT_BASE_DIR"]
    from nanochat.checkpoint_manager import load_model
    from nanochat.common import autodetect_device_type, autodetect_dtype
    from nanochat.engine import Engine
    device = torch.device(autodetect_device_type())
    model, tokenizer, _ = load_model("sft", device, "eval")
    dtype = autodetect_dtype(device.type)
    ctx = torch.amp.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32 else torch.no_grad()
    prompt = tokenizer.render_for_completion(
        {"messages": [{"role": "user", "content": "What is 2 + 3?"}]})
    with ctx:
        cached = Engine(model, tokenizer).generate_batch(prompt, max_tokens=24, temperature=0.0)[0][0][len(prompt):]
        if not cached:
            raise RuntimeError("the Engine generated no token")
        with torch.no_grad():  # one full forward over prompt + the cached decode's tokens
            logits = model(torch.tensor([prompt + cached], device=device))[0, len(prompt) - 1:-1].float()
    # bf16 rounds differently with and without the cache (tests/test_engine.py measures up to 0.15
    # in the logits), so a token counts as greedy when its full-forward logit is within 0.25 of the best
    chosen = logits[torch.arange(len(cached)), torch.tensor(cached, device=device)]
    gap = (logits.max(dim=-1).values - chosen).max().item()
    exact = sum(int(t == a) for t, a in zip(cached, logits.argmax(dim=-1).tolist()))
    if gap > 0.25:
        raise RuntimeError(f"a KV-cache greedy token is {gap:.3f} below the full forward's best logit")
    return {"detail": f"{len(cached)} greedy KV-cache tokens: {exact} are the full forward's argmax, every one "
                      f"within {gap:.3f} of its best logit ({dtype})"}


def check_chat_web(env):
    """chat_web serves the SFT model; the official OpenAI client gets a reply and a stream."""
    from openai import OpenAI
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--port", str(port), "--source", "sft"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        deadline = time.time() + 120
        while True:
            try:
                model_id = client.models.list().data[0].id
                break
            except Exception:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("chat_web did not come up: " + (server.stdout.read() if server.poll() is not None
                                                                       else "no answer in 120 s"))
                time.sleep(1)
        t0 = time.time()
        reply = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hello!"}],
                                               max_tokens=16)
        latency = time.time() - t0
        t0 = time.time()
        stream = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=16, stream=True)
        first, chunks, finish = None, 0, None
        for chunk in stream:
            chunks += 1
            if chunk.choices:
                if chunk.choices[0].delta.content:
                    first = first or time.time() - t0
                finish = chunk.choices[0].finish_reason or finish
        # a barely trained model may stop at once: an empty reply is fine, a stream that never ends is not
        if not isinstance(reply.choices[0].message.content, str) or finish is None:
            raise RuntimeError(f"reply {reply} / stream of {chunks} chunks without a finish_reason")
        first_text = "no content (the model stopped at once)" if first is None else f"first content after {first:.3f} s"
        return {"detail": f"reply {reply.usage.completion_tokens} tokens in {latency:.2f} s; stream: {first_text}, "
                          f"{chunks} chunks, finish_reason {finish}"}
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_stages(report, sizes, base_dir):
    global STAGE_TIMEOUT_S
    preset = sizes["preset"]
    env = dict(os.environ, NANOCHAT_BASE_DIR=base_dir, PYTHONUNBUFFERED="1")
    # a stage started near the end of the budget must not outlive the `run` call
    STAGE_TIMEOUT_S = min(STAGE_TIMEOUT_S, max(60, report.time_left() + 90))
    base = report.run("base_train (compile, bf16, fused AdamW, Muon)", check_base_train, env, preset)
    report.run("base_train resume from a checkpoint", check_resume, env, preset, base)
    report.run("mid_train", lambda: {"detail": f"loss {last_loss(run_script('scripts.mid_train', *stage_flags('mid', preset), env=env)):.4f}"})
    report.run("chat_sft", lambda: {"detail": f"loss {last_loss(run_script('scripts.chat_sft', *stage_flags('sft', preset), env=env)):.4f}"})
    report.run("chat_rl", lambda: {"detail": run_script("scripts.chat_rl", *stage_flags("rl", preset), env=env)
                                   .strip().splitlines()[-1][:300]})
    report.run("chat_eval", lambda: {"detail": " | ".join(run_script(
        "scripts.chat_eval", "-i", "sft", "--data", "offline", *stage_flags("eval", preset), env=env)
        .strip().splitlines()[-4:])[-600:]})
    report.run("Engine KV-cache decode", check_engine, env)
    report.run("chat_web + OpenAI client", check_chat_web, env)


# -----------------------------------------------------------------------------
# Measurements

def device_type():
    return "cuda" if torch.cuda.is_available() else "cpu"


def measure_training(report, depth, sizes, mode="compile", batch_size=None):
    """One row of the training table: tok/s, MFU, predicted vs measured peak memory, compile time.
    batch_size None: what run_shape picks on this GPU (halved on out-of-memory, which is recorded)."""
    dt = device_type()
    if batch_size is None:
        shape = run_shape("gpu", dt, depth=depth, max_seq_len=sizes["seq"], vocab_size=sizes["vocab"],
                          **({} if dt == "cuda" else {"device_batch_size": 2}))
        batch_size = shape.device_batch_size
    notes = []
    while True:
        try:
            r = measure_train_step(depth, batch_size, sizes["seq"], sizes["vocab"], mode, sizes["steps"],
                                   sizes["warmup"], dt)
            break
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            notes.append(f"OOM at {batch_size}")
            batch_size //= 2
            free_memory()
    peak = report.data["machine"].get("peak_bf16_flops")
    predicted = predict_peak_memory(depth, sizes["seq"], batch_size, sizes["vocab"], bf16=dt == "cuda",
                                    compile=mode != "eager").total
    row = {"depth": depth, "mode": mode, "batch": batch_size, "seq": sizes["seq"], "tok_s": round(r["tok_s"]),
           "mfu": round(100 * r["flops_per_token"] * r["tok_s"] / peak, 1) if peak else None,
           "predicted_gib": round(predicted / 2**30, 1),
           "allocated_gib": round(r["peak_allocated"] / 2**30, 1) if r["peak_allocated"] else None,
           "reserved_gib": round(r["peak_reserved"] / 2**30, 1) if r["peak_reserved"] else None,
           "compile_s": round(r["first_step_s"] - r["step_s"], 1), "losses": [round(x, 4) for x in r["losses"]],
           "notes": ", ".join(notes)}
    report.data["train"].append(row)
    mfu = "n/a" if row["mfu"] is None else f"{row['mfu']}%"
    peak_text = "n/a" if row["allocated_gib"] is None else f"{row['allocated_gib']} GiB"
    return {"detail": f"d{depth} {mode} {batch_size}x{sizes['seq']}: {row['tok_s']:,} tok/s, MFU {mfu}, "
                      f"peak {peak_text} (predicted {row['predicted_gib']} GiB) {row['notes']}"}


def measure_decode(report, sizes):
    """Decode tok/s, time to first token and bandwidth use at several batch sizes, for the model
    as chat_web holds it today (fp32 weights + bf16 autocast) and with bf16 weights."""
    from nanochat.engine import Engine
    from nanochat.tokenizer import get_tokenizer
    dt = device_type()
    tokenizer = get_tokenizer()
    depth = sizes["decode_depth"]
    bandwidth = report.data["machine"].get("peak_bandwidth")
    synchronize = torch.cuda.synchronize if dt == "cuda" else (lambda: None)
    lines = []
    for weights in ("fp32+autocast", "bf16"):
        model = build_model(depth, tokenizer.get_vocab_size(), sizes["prompt_tokens"] + sizes["decode_tokens"], dt)
        model.eval()
        if weights == "bf16":
            model = model.to(torch.bfloat16)
        engine = Engine(model, tokenizer)
        prompt = torch.randint(0, 255, (sizes["prompt_tokens"],)).tolist()
        weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "wte" not in n)
        for batch in sizes["decode_batches"]:
            ctx = (torch.amp.autocast(device_type=dt, dtype=torch.bfloat16) if dt == "cuda" and weights != "bf16"
                   else torch.no_grad())
            with ctx:
                for _ in engine.generate(prompt, batch, max_tokens=4, temperature=1.0):  # warm up
                    pass
                synchronize()
                t0 = time.perf_counter()
                steps, t_first = 0, None
                for _ in engine.generate(prompt, batch, max_tokens=sizes["decode_tokens"], temperature=1.0):
                    steps += 1
                    if t_first is None:
                        synchronize()
                        t_first = time.perf_counter()
                synchronize()
                t_end = time.perf_counter()
            decode_s = max(t_end - t_first, 1e-9)
            tok_s = batch * (steps - 1) / decode_s
            kv_bytes = 2 * depth * batch * (sizes["prompt_tokens"] + steps / 2) * model.config.n_embd * 2
            used = (weight_bytes + kv_bytes) * (steps - 1) / decode_s
            row = {"depth": depth, "weights": weights, "batch": batch, "prompt": sizes["prompt_tokens"],
                   "tokens": steps, "ttft_ms": round(1000 * (t_first - t0), 1), "tok_s": round(tok_s, 1),
                   "bandwidth_pct": round(100 * used / bandwidth, 1) if bandwidth else None}
            report.data["decode"].append(row)
            lines.append(f"{weights} b{batch}: {row['tok_s']} tok/s, TTFT {row['ttft_ms']} ms")
        del model, engine
        free_memory()
    return {"detail": "; ".join(lines)}


def measure_compiled_decode(report, sizes):
    """The Engine's decode step eager vs through torch.compile (Engine(compile_decode=True): CUDA
    graphs on CUDA), the way chat_web --compile serves: tok/s at each batch, the one-off compile
    time, and whether greedy decoding gives the same tokens both ways."""
    from nanochat.engine import Engine
    from nanochat.tokenizer import get_tokenizer
    dt = device_type()
    tokenizer = get_tokenizer()
    depth = sizes["decode_depth"]
    synchronize = torch.cuda.synchronize if dt == "cuda" else (lambda: None)
    model = build_model(depth, tokenizer.get_vocab_size(), sizes["prompt_tokens"] + sizes["decode_tokens"], dt).eval()
    if dt == "cuda":
        model = model.to(torch.bfloat16)
    prompt = torch.randint(0, 255, (sizes["prompt_tokens"],)).tolist()
    lines = []
    for batch in sizes["compile_batches"]:
        row = {"depth": depth, "batch": batch}
        tokens = {}
        for mode in ("eager", "compiled"):
            engine = Engine(model, tokenizer, compile_decode=mode == "compiled")
            with torch.no_grad():
                t0 = time.perf_counter()
                engine.generate_batch(prompt, batch, max_tokens=4, temperature=1.0)  # warm-up (compiles)
                synchronize()
                warm_s = time.perf_counter() - t0
                if mode == "compiled" and engine.compiled_decode is None:
                    raise RuntimeError("the compiled decode step failed and fell back to eager (its message is above)")
                t0 = time.perf_counter()
                results, _ = engine.generate_batch(prompt, batch, max_tokens=sizes["decode_tokens"], temperature=1.0)
                synchronize()
                seconds = time.perf_counter() - t0
                greedy, _ = engine.generate_batch(prompt, 1, max_tokens=32, temperature=0.0)
            row[f"{mode}_tok_s"] = round(sum(len(r) - len(prompt) for r in results) / seconds, 1)
            tokens[mode] = greedy[0]
            if mode == "compiled":
                row["compile_s"] = round(warm_s, 1)
        row["speedup"] = round(row["compiled_tok_s"] / row["eager_tok_s"], 2)
        row["same_greedy_tokens"] = tokens["eager"] == tokens["compiled"]
        report.data["compiled_decode"].append(row)
        lines.append(f"b{batch}: {row['speedup']}x ({row['eager_tok_s']} -> {row['compiled_tok_s']} tok/s)")
    del model
    free_memory()
    return {"detail": "; ".join(lines)}


def measure_serving(report, sizes):
    """bench/serving.py on this device: chat_web decoding one request at a time (--max-batch 1)
    vs continuously batched, under 1..64 concurrent streaming OpenAI clients, random weights."""
    out = os.path.join(report.out_dir, "serving.json")
    args = ["--depth", str(sizes["serving_depth"]), "--clients", ",".join(map(str, sizes["serving_clients"])),
            "--max-tokens", str(sizes["serving_tokens"]), "--requests-per-client", "1", "--repeats", "1",
            "--device-type", device_type(),
            "--out", out]
    proc = subprocess.run([sys.executable, "-m", "bench.serving", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=max(60, report.time_left() + 120))
    if proc.returncode != 0:
        raise RuntimeError(f"bench.serving exited {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}")
    from bench.serving import summarize
    with open(out) as f:
        rows = summarize(json.load(f), "batch 1 (baseline)")
    for r in rows:
        report.data["serving"].append({
            "server": r["server"], "max_batch": r["max_batch"], "clients": r["clients"],
            "aggregate_tok_s": round(r["aggregate_tok_s"], 1), "ratio": round(r["ratio"], 2),
            "per_request_tok_s": round(r["per_request_tok_s"], 1), "ttft_p50_s": round(r["ttft_p50_s"], 3),
            "ttft_p95_s": round(r["ttft_p95_s"], 3), "errors": r["errors"], "slots_free_after": r["slots_free_after"]})
    if any(r["errors"] or not r["slots_free_after"] for r in rows):
        raise RuntimeError(f"errors or busy slots after the run: {rows}")
    return {"detail": "; ".join(f"{r['server']} x{r['clients']}: {r['aggregate_tok_s']} tok/s" for r in report.data["serving"])}


def measure_sdpa(report, sizes):
    """Causal attention forward + backward at d20's head shape under each SDPA backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dt = device_type()
    dtype = torch.bfloat16 if dt == "cuda" else torch.float32
    B, H, T, D = sizes["sdpa_batch"], 10, sizes["seq"], 128
    q, k, v = (torch.randn(B, H, T, D, device=dt, dtype=dtype, requires_grad=True) for _ in range(3))
    synchronize = torch.cuda.synchronize if dt == "cuda" else (lambda: None)
    lines = []
    for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        try:
            with sdpa_kernel(getattr(SDPBackend, backend)):
                for i in range(4):
                    if i == 1:
                        synchronize()
                        t0 = time.perf_counter()
                    torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
                synchronize()
            ms = (time.perf_counter() - t0) / 3 * 1000
            report.data["sdpa"].append({"backend": backend, "ms": round(ms, 2), "shape": f"{B}x{H}x{T}x{D}"})
            lines.append(f"{backend} {ms:.2f} ms")
        except Exception as e:
            report.data["sdpa"].append({"backend": backend, "ms": None, "error": str(e).splitlines()[0][:200]})
            lines.append(f"{backend} unavailable")
    timed = [r for r in report.data["sdpa"] if r["ms"] is not None]
    if timed:
        report.data["settings"]["fastest SDPA backend"] = min(timed, key=lambda r: r["ms"])["backend"]
    return {"detail": "; ".join(lines)}


def measure_fp8(report, sizes, depth):
    """bf16 (compiled) vs fp8 (compiled, torchao tensorwise) at the same batch: tok/s and losses."""
    from nanochat.fp8 import fp8_unsupported_reason
    reason = fp8_unsupported_reason(torch.device(device_type()))
    if reason:
        report.data["fp8"].append({"depth": depth, "skipped": reason})
        return {"detail": f"skipped: {reason}"}
    done = [r for r in report.data["train"] if r["depth"] == depth and r["mode"] == "compile"]
    if not done:  # compile time counts: reuse the throughput row of this depth when there is one
        measure_training(report, depth, sizes, "compile")
    bf16 = (done or report.data["train"])[-1]
    measure_training(report, depth, sizes, "fp8", batch_size=bf16["batch"])
    fp8 = report.data["train"][-1]
    row = {"depth": depth, "batch": bf16["batch"], "bf16_tok_s": bf16["tok_s"], "fp8_tok_s": fp8["tok_s"],
           "speedup": round(fp8["tok_s"] / bf16["tok_s"], 3), "bf16_losses": bf16["losses"],
           "fp8_losses": fp8["losses"], "bf16_gib": bf16["allocated_gib"], "fp8_gib": fp8["allocated_gib"]}
    report.data["fp8"].append(row)
    return {"detail": f"d{depth}: fp8 {row['speedup']}x bf16 tok/s"}


def measure_memory_grid(report, sizes):
    """The memory model's eager prediction against a real training step's peak, batch by batch."""
    if device_type() != "cuda":
        return {"detail": "skipped: measuring the peak needs CUDA (the CPU side is tests/test_run_shape.py)"}
    depth = sizes["memory_depth"]
    for batch in sizes["memory_batches"]:
        predicted = predict_peak_memory(depth, sizes["seq"], batch, sizes["vocab"], compile=False).total
        model = build_model(depth, sizes["vocab"], sizes["seq"], "cuda")
        try:
            allocated, reserved = cuda_peak_bytes(model, batch, compile=False)
        except torch.OutOfMemoryError:
            allocated = reserved = None
        del model
        free_memory()
        report.data["memory"].append({"depth": depth, "batch": batch, "compile": False,
                                      "predicted_gib": round(predicted / 2**30, 1),
                                      "allocated_gib": allocated and round(allocated / 2**30, 1),
                                      "reserved_gib": reserved and round(reserved / 2**30, 1)})
        if allocated is None:
            break
    return {"detail": ", ".join(f"b{r['batch']}: {r['predicted_gib']} vs {r['allocated_gib']}"
                                for r in report.data["memory"])}


def measure_autotune(report, sizes):
    """torch.compile mode 'max-autotune-no-cudagraphs' against the default, at the same shape."""
    depth = sizes["autotune_depth"]
    if depth is None:
        return {"detail": "skipped at CPU sizes"}
    measure_training(report, depth, sizes, "compile")
    default = report.data["train"][-1]
    import torch._inductor.config as inductor_config
    inductor_config.max_autotune = True
    try:
        measure_training(report, depth, sizes, "compile", batch_size=default["batch"])
    finally:
        inductor_config.max_autotune = False
    tuned = report.data["train"][-1]
    tuned["mode"] = "compile max-autotune"
    faster = tuned["tok_s"] > 1.02 * default["tok_s"]
    report.data["settings"]["torch.compile mode"] = "max-autotune" if faster else "default"
    return {"detail": f"d{depth}: max-autotune {tuned['tok_s'] / default['tok_s']:.3f}x default "
                      f"(compile {tuned['compile_s']} s vs {default['compile_s']} s)"}


# -----------------------------------------------------------------------------
# Markdown

def table(rows, columns):
    if not rows:
        return ""
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join("-" if r.get(c) is None else str(r.get(c)) for c in columns) + " |\n"
                          for r in rows) + "\n"


def to_markdown(data):
    m = data["machine"]
    out = [f"### Device check part {data['part']} ({data['mode']} sizes), {m.get('date')}\n\n",
           f"{m.get('gpu', 'CPU')} {m.get('capability', '')} {m.get('memory_gib', '')} GiB | torch {m['torch']} | "
           f"CUDA {m['cuda']} | Python {m['python']} | MFU against {m.get('peak_bf16_flops')} FLOP/s bf16 dense\n\n",
           table(data["checks"], ["name", "status", "seconds", "detail"])]
    if data["train"]:
        out += ["Training step (synthetic tokens, median of the timed steps; memory: max allocated, predicted by "
                "nanochat/run_shape.py):\n\n",
                table(data["train"], ["depth", "mode", "batch", "seq", "tok_s", "mfu", "predicted_gib", "allocated_gib",
                                      "reserved_gib", "compile_s", "notes"])]
    if data["decode"]:
        out += ["Decode (Engine, KV cache, random weights, sampling at temperature 1; bandwidth: (weights as stored + "
                "KV cache) read per step / peak; fp32+autocast also re-casts every weight each step, about twice "
                "that traffic):\n\n",
                table(data["decode"], ["depth", "weights", "batch", "prompt", "tokens", "ttft_ms", "tok_s",
                                       "bandwidth_pct"])]
    if data["serving"]:
        out += ["Serving (bench/serving.py: chat_web on 127.0.0.1, streaming OpenAI clients, random weights, fixed reply "
                "length; ratio: aggregate tok/s against --max-batch 1 at the same clients):\n\n",
                table(data["serving"], ["server", "max_batch", "clients", "aggregate_tok_s", "ratio", "per_request_tok_s",
                                        "ttft_p50_s", "ttft_p95_s", "errors", "slots_free_after"])]
    if data["compiled_decode"]:
        out += ["Decode step eager vs compiled (Engine(compile_decode=True), CUDA graphs on CUDA; bf16 weights on CUDA; "
                "sampling at temperature 1; same_greedy_tokens: 32 greedy tokens equal both ways):\n\n",
                table(data["compiled_decode"], ["depth", "batch", "eager_tok_s", "compiled_tok_s", "speedup", "compile_s",
                                                "same_greedy_tokens"])]
    if data["sdpa"]:
        out += ["SDPA backends (causal forward + backward):\n\n", table(data["sdpa"], ["backend", "shape", "ms", "error"])]
    if data["fp8"]:
        out += ["bf16 vs fp8 (compiled, same batch, same synthetic batch every step):\n\n",
                table(data["fp8"], ["depth", "batch", "bf16_tok_s", "fp8_tok_s", "speedup", "bf16_gib", "fp8_gib",
                                    "bf16_losses", "fp8_losses", "skipped"])]
    if data["memory"]:
        out += ["Memory model, eager (predicted vs measured):\n\n",
                table(data["memory"], ["depth", "batch", "predicted_gib", "allocated_gib", "reserved_gib"])]
    if data["settings"]:
        out += ["Fastest stable settings found: " + "; ".join(f"{k}: {v}" for k, v in data["settings"].items()) + "\n"]
    return "".join(out)


# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="The GPU device check (see the module docstring)")
    parser.add_argument("--part", default="1", choices=["1", "2", "3", "all"])
    parser.add_argument("--cpu", action="store_true", help="CPU sizes (tests; a GPU is not needed)")
    parser.add_argument("--out", default=os.environ.get("OUT", "device_check_out"), help="where results go (default $OUT)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"per part: start no new item after this many seconds (default {BUDGET_S})")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("device_check: no CUDA GPU; run with --cpu for the CPU-sized check")
    mode = "cpu" if args.cpu else "gpu"
    sizes = SIZES[mode]
    base_dir = os.environ.get("NANOCHAT_BASE_DIR")
    if not base_dir or not os.path.isdir(os.path.join(base_dir, "tokenizer")):
        sys.exit("device_check: NANOCHAT_BASE_DIR must hold base_data/ shards and a trained tokenizer/ "
                 "(dev/device_check.sh sets it up from .device_pack/)")
    parts = ["1", "2", "3"] if args.part == "all" else [args.part]
    failed = []
    for part in parts:
        report = Report(args.out, part, mode, args.budget_s or BUDGET_S[part])
        if part == "1":  # the d20 number first: the stages after it stop early if the budget runs out
            for depth in sizes["part1_depths"]:
                report.run(f"throughput d{depth}", measure_training, report, depth, sizes)
            run_stages(report, sizes, base_dir)
        elif part == "3":
            report.run(f"serving d{sizes['serving_depth']}", measure_serving, report, sizes)
            report.run(f"compiled decode d{sizes['decode_depth']}", measure_compiled_decode, report, sizes)
        else:  # the cheap items first (no compilation), then by value
            report.run("memory model grid", measure_memory_grid, report, sizes)
            report.run(f"decode d{sizes['decode_depth']}", measure_decode, report, sizes)
            report.run("SDPA backends", measure_sdpa, report, sizes)
            for depth in sizes["part2_depths"]:
                report.run(f"throughput d{depth}", measure_training, report, depth, sizes)
            for depth in sizes["fp8_depths"]:
                report.run(f"bf16 vs fp8 d{depth}", measure_fp8, report, sizes, depth)
            report.run("torch.compile max-autotune", measure_autotune, report, sizes)
        report.write()
        print(to_markdown(report.data))
        failed += [c["name"] for c in report.data["checks"] if c["status"] == "fail"]
    if failed:
        print(f"device_check: failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
