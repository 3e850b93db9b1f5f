"""`python -m loraforge.bench.soak --minutes 5` (`make soak`): a bounded soak of `loraforge serve`.

It starts a real server on 127.0.0.1 (the bundled smollm2-135m, or ``--model``) with two random
adapters, keeps a third in a temporary ``--adapter-root`` to load and unload over and over, and
for the given minutes sends mixed traffic from a few client threads: streamed chat completions on
the base model and the adapters (some clients drop the connection mid-stream), non-streamed chat
and text completions, clients that give up early, and requests on the adapter being cycled.

Then it prints the requests served, the errors, and the server's resident memory (VmRSS) after
warm-up and at the end; the exit code is 1 if there was any error or RSS grew over 5 %.

An error is anything the client did not cause: a 5xx, an unexpected 4xx, a transport failure, or
a stream that breaks (an in-band error, or no ``[DONE]``) without the client closing it. What the
traffic itself asks for is not: a 404 for the cycled adapter while it is unloaded, or a request on
it that ends because it was unloaded meanwhile.

The server runs with OMP_NUM_THREADS=1 unless ``--threads`` says otherwise (``--threads 0``: torch's
own default). On a shared 2-core box, torch's default 2-thread team made a lone request on
smollm2-135m ~10x slower whenever another process was busy (25 tokens: 12-21 s against 1.3 s with
one thread; a batch of 8 was unaffected), and the timeouts that follow would hide what a soak is
for: errors and memory growth.

Only the standard library talks HTTP here (http.client), so `loraforge[serve]` is enough.
"""

from __future__ import annotations

import argparse
import http.client
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from loraforge.bench.served import (
    TIMEOUT,
    Client,
    free_port,
    rss_mib,
    start_server,
    stop_server,
    wait_healthy,
)

EXTRA = "extra"  # the adapter loaded and unloaded all along
MAX_RSS_GROWTH = 5.0  # percent
PROMPTS = [
    "Hello! Who are you?",
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a short poem about the sea.",
    "Explain what a CPU cache is in two sentences.",
    "List five fruits, one per line.",
    "Translate 'good morning' into Spanish and German.",
    "What is 17 times 23? Show your working.",
]


class Tally:
    """Outcome counts from every thread, and the first few errors as examples."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.examples: list[str] = []

    def add(self, kind: str, detail: str = "") -> None:
        with self.lock:
            self.counts[kind] += 1
            if kind == "error" and len(self.examples) < 8:
                self.examples.append(detail[:300])


def _unloaded_meanwhile(model: str, status: int | None, body, messages: list[str]) -> bool:
    """What a request on the cycled adapter may get without any fault: not loaded (404), or
    unloaded while it ran (a 400 or an in-band error that says so)."""
    if model != EXTRA:
        return False
    err = body.get("error") if isinstance(body, dict) else None
    err = err if isinstance(err, dict) else {}
    if status == 404 and err.get("code") == "model_not_found":
        return True
    text = " ".join([str(err.get("message", "")), *messages])
    return status in (200, 400) and "unloaded" in text


def one_request(
    client: Client, rng: random.Random, models: list[str], max_tokens: int, tally: Tally
) -> None:
    model = rng.choices(models, weights=[4, 2.5, 2.5, 1][: len(models)])[0]
    n = rng.randint(8, max_tokens)
    sampling = rng.choice([{"temperature": 0}, {"temperature": 0.7, "top_p": 0.9}])
    messages = [{"role": "user", "content": rng.choice(PROMPTS)}]
    kind = rng.choices(["stream", "chat", "completion", "impatient"], weights=[55, 30, 10, 5])[0]
    try:
        if kind == "stream":
            drop = rng.randint(1, 5) if rng.random() < 0.3 else None
            body = {"model": model, "messages": messages, "max_tokens": n, **sampling}
            r = client.stream({**body, "stream": True}, drop_after=drop)
            if r["dropped"]:
                tally.add("client_disconnect")
            elif r["status"] == 200 and r["done"] and not r["errors"] and r["finish"]:
                tally.add("served")
            elif _unloaded_meanwhile(model, r["status"], r["body"], r["errors"]):
                tally.add("expected_refusal")
            else:
                detail = f"stream on {model}: status {r['status']}, done={r['done']}, "
                tally.add("error", detail + f"errors={r['errors']} body={r['body']}")
            return
        if kind == "completion":
            path = "/v1/completions"
            body = {"model": model, "prompt": messages[0]["content"], "max_tokens": n}
        else:
            path = "/v1/chat/completions"
            body = {"model": model, "messages": messages, "max_tokens": n}
        timeout = rng.uniform(0.05, 0.5) if kind == "impatient" else None
        try:
            status, data = client.call("POST", path, {**body, **sampling}, timeout=timeout)
        except TimeoutError:
            if kind == "impatient":
                tally.add("client_disconnect")
                return
            raise
        if status == 200 and data and data.get("choices"):
            tally.add("served")
        elif _unloaded_meanwhile(model, status, data, []):
            tally.add("expected_refusal")
        else:
            tally.add("error", f"{path} on {model}: status {status}: {data}")
    except (OSError, http.client.HTTPException, ValueError) as e:
        tally.add("error", f"{kind} on {model}: {type(e).__name__}: {e}")


def traffic(port: int, seed: int, deadline: float, models: list[str], n: int, tally: Tally):
    rng = random.Random(seed)
    client = Client(port)
    while time.monotonic() < deadline:
        one_request(client, rng, models, n, tally)


def cycle_adapter(port: int, seed: int, deadline: float, tally: Tally) -> None:
    """Load and unload the extra adapter until the deadline (each step must be a 200)."""
    rng = random.Random(seed)
    client = Client(port)
    while time.monotonic() < deadline:
        for path, body in (
            ("/v1/load_lora_adapter", {"lora_name": EXTRA, "lora_path": EXTRA}),
            ("/v1/unload_lora_adapter", {"lora_name": EXTRA}),
        ):
            try:
                status, data = client.call("POST", path, body)
            except (OSError, http.client.HTTPException) as e:
                status, data = None, f"{type(e).__name__}: {e}"
            if status != 200:
                tally.add("error", f"{path}: status {status}: {data}")
            time.sleep(rng.uniform(0.3, 2.0))
        tally.add("adapter_cycle")


def warm_up(port: int, models: list[str], max_tokens: int, max_batch: int, tally: Tally):
    """Every code path once, a full batch of the longest requests (the KV cache at its size),
    and one load/unload cycle, before the memory is measured. A failure counts as an error."""
    client = Client(port)
    longest = [{"role": "user", "content": max(PROMPTS, key=len)}]

    def expect_200(method: str, path: str, body: dict) -> None:
        try:
            status, data = client.call(method, path, body)
        except (OSError, http.client.HTTPException) as e:
            status, data = None, f"{type(e).__name__}: {e}"
        if status != 200:
            tally.add("error", f"warm-up {path}: status {status}: {data}")

    for model in models[:-1]:
        body = {"model": model, "messages": longest, "max_tokens": 4, "stream": True}
        try:
            client.stream(body, drop_after=1)
        except (OSError, http.client.HTTPException) as e:
            tally.add("error", f"warm-up stream on {model}: {type(e).__name__}: {e}")
        expect_200("POST", "/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": 4})
    threads = [
        threading.Thread(
            target=expect_200,
            args=("POST", "/v1/chat/completions", {
                "model": models[i % (len(models) - 1)], "messages": longest,
                "max_tokens": max_tokens,
            }),
            daemon=True,
        )
        for i in range(max_batch)
    ]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT + 5)
    expect_200("POST", "/v1/load_lora_adapter", {"lora_name": EXTRA, "lora_path": EXTRA})
    expect_200("POST", "/v1/unload_lora_adapter", {"lora_name": EXTRA})


# ---- the run ------------------------------------------------------------------------------------


def make_adapters(spec: str, root: Path, seed: int) -> dict[str, Path]:
    from loraforge.bench.generate import make_random_adapters
    from loraforge.models import resolve_model

    dirs = make_random_adapters(resolve_model(spec), spec, 3, root, seed=seed)
    names = ["soak-a", "soak-b", EXTRA]
    out = {}
    for name, d in zip(names, dirs, strict=True):
        d.rename(root / name)
        out[name] = root / name
    return out


def run(args) -> int:
    from loraforge.models import DEFAULT_MODEL

    spec = args.model or DEFAULT_MODEL
    seconds = args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="loraforge-soak-") as tmp:
        root = Path(tmp) / "adapters"
        root.mkdir()
        print(f"soak: making 3 random adapters on {spec} ...", flush=True)
        adapters = make_adapters(spec, root, args.seed)
        served = {k: v for k, v in adapters.items() if k != EXTRA}
        port, log = free_port(), Path(tmp) / "serve.log"
        proc = start_server(spec, served, root, port, log, args)
        try:
            wait_healthy(port, proc, log)
            status, health = Client(port).call("GET", "/health")
            base = health["model"]
            models = [base, *served, EXTRA]
            print(f"soak: serving {', '.join(models[:-1])} (pid {proc.pid}); warming up ...")
            tally = Tally()
            warm_up(port, models, args.max_tokens, 8, tally)
            time.sleep(1)
            rss_start = rss_mib(proc.pid)
            print(
                f"soak: RSS after warm-up {rss_start:.1f} MiB; {args.minutes:g} min of traffic "
                f"from {args.clients} clients + 1 adapter cycler",
                flush=True,
            )
            t0 = time.monotonic()
            deadline = t0 + seconds
            threads = [
                threading.Thread(
                    target=traffic,
                    daemon=True,
                    args=(port, args.seed + i, deadline, models, args.max_tokens, tally),
                )
                for i in range(1, args.clients + 1)
            ] + [
                threading.Thread(
                    target=cycle_adapter, args=(port, args.seed, deadline, tally), daemon=True
                )
            ]
            for t in threads:
                t.start()
            peak, next_report = rss_start, t0 + 30
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(1)
                now = rss_mib(proc.pid)
                peak = peak if now != now else max(peak, now)  # NaN: the server is gone
                if time.monotonic() >= next_report:
                    next_report += 30
                    c = tally.counts
                    print(
                        f"  {time.monotonic() - t0:5.0f} s: served {c['served']}, "
                        f"errors {c['error']}, RSS {rss_mib(proc.pid):.1f} MiB",
                        flush=True,
                    )
            for t in threads:  # each finishes its request in flight: at most TIMEOUT
                t.join(TIMEOUT + 5)
            elapsed = min(time.monotonic(), deadline) - t0
            stuck = sum(t.is_alive() for t in threads)
            if stuck:
                tally.add(
                    "error", f"{stuck} client threads still busy {TIMEOUT:.0f} s after the end"
                )
            alive = proc.poll() is None
            if not alive:
                tally.add("error", f"the server died (exit {proc.returncode})")
                rss_end = float("nan")
            else:
                status, _ = Client(port).call("GET", "/health")
                if status != 200:
                    tally.add("error", f"/health answers {status} after the soak")
                time.sleep(2)  # let cancelled work drain before the last measure
                rss_end = rss_mib(proc.pid)
                peak = max(peak, rss_end)
        finally:
            stop_server(proc)
            if args.keep_log:
                Path(args.keep_log).write_text(log.read_text())
    return report(tally, elapsed, spec, rss_start, rss_end, peak, args)


def report(tally: Tally, elapsed: float, spec, rss_start, rss_end, peak, args) -> int:
    c = tally.counts
    growth = (rss_end - rss_start) / rss_start * 100
    requests = c["served"] + c["client_disconnect"] + c["expected_refusal"] + c["error"]
    print(f"\nsoak: {elapsed:.0f} s of traffic on {spec}, {args.clients} clients, seed {args.seed}")
    print(
        f"requests served: {c['served']} of {requests} sent "
        f"({c['served'] / max(elapsed, 1e-9):.1f}/s); client disconnects "
        f"{c['client_disconnect']}; expected refusals (cycled adapter unloaded) "
        f"{c['expected_refusal']}; adapter load/unload cycles {c['adapter_cycle']}"
    )
    print(f"errors: {c['error']}")
    for example in tally.examples:
        print(f"  - {example}")
    print(
        f"server RSS: start {rss_start:.1f} MiB (after warm-up), end {rss_end:.1f} MiB, "
        f"growth {growth:+.2f}% (peak {peak:.1f} MiB)"
    )
    failed = []
    if c["error"]:
        failed.append(f"{c['error']} errors")
    if not growth <= MAX_RSS_GROWTH:  # NaN (the server died) fails too
        failed.append(f"RSS grew {growth:+.2f}% (limit {MAX_RSS_GROWTH:g}%)")
    print("result: " + ("FAIL: " + "; ".join(failed) if failed else "OK"))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loraforge.bench.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--minutes", type=float, default=5.0, help="Traffic time (default 5).")
    p.add_argument("--model", default=None, help="Base model (default: smollm2-135m).")
    p.add_argument("--clients", type=int, default=6, help="Client threads (default 6).")
    p.add_argument("--max-tokens", type=int, default=64, help="The server's --max-tokens.")
    p.add_argument("--dtype", default=None, help="The server's --dtype (default: its own).")
    p.add_argument(
        "--threads", type=int, default=1, help="The server's OMP_NUM_THREADS (0: torch's default)."
    )
    p.add_argument("--seed", type=int, default=0, help="Seed of the adapters and the traffic.")
    p.add_argument("--keep-log", default=None, help="Copy the server's log to this file.")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.clients < 1 or args.max_tokens < 8:
        p.error("--minutes > 0, --clients >= 1 and --max-tokens >= 8, please")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
