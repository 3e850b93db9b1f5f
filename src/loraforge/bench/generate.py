"""`loraforge bench generate`: the engine's decode speed against HF ``generate``, same run.

Three figures, each measured on the same model, dtype and prompts:
- one stream: completion tokens / wall time of one greedy request (engine vs HF ``generate``),
  the two alternated ``repeats`` times, best run of each kept;
- 8 streams: total completion tokens / wall time of 8 requests generated together (the engine
  batches them; HF gets the same 8 prompts as one left-padded batch);
- adapter switch: with >= 4 adapters loaded, requests alternate adapters; the switch cost is the
  time the engine spends preparing a batch's adapter weights, and TTFT with/without a switch is
  reported next to it.
Prompts ask for long answers, and greedy engine == greedy HF, so both produce the same tokens.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from loraforge.bench.report import append_row, machine_description, machine_info
from loraforge.infer.engine import Engine, SamplingParams

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe a walk through a busy market in a large city, with every sound and smell.",
    "Write a detailed guide to planting and caring for a vegetable garden.",
    "Tell the history of the bicycle from its invention to today.",
    "Write a long letter from a sailor to his family describing his voyage.",
    "Explain how computers store numbers and text, with examples.",
    "Describe the life cycle of a star in as much detail as you can.",
]


@dataclass
class BenchResult:
    model: str
    dtype: str
    max_new_tokens: int
    machine: dict
    single: dict = field(default_factory=dict)
    batch: dict = field(default_factory=dict)
    adapter_switch: dict = field(default_factory=dict)


def make_random_adapters(model_dir: Path, spec: str, n: int, out: Path, seed: int = 0) -> list:
    """``n`` random LoRA adapters (r=8, all-linear, non-zero B) for the switch benchmark."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loraforge.adapters import AdapterMeta, write_meta
    from loraforge.data.tokenize import DEFAULT_SYSTEM, resolve_template
    from loraforge.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    dirs = []
    for i in range(n):
        torch.manual_seed(seed + i)
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
        peft_model = get_peft_model(base, cfg)
        d = out / f"bench-adapter-{i}"
        peft_model.save_pretrained(d)
        write_meta(d, AdapterMeta(spec, resolve_template(tok), DEFAULT_SYSTEM))
        dirs.append(d)
    return dirs


def _hf_generate(model, tok, prompts: list[list[int]], max_new: int) -> tuple[int, float]:
    """Greedy HF generate of a left-padded batch: (completion tokens, seconds)."""
    pad = tok.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor(
        [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device
    )
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new,
            pad_token_id=pad,
        )
    dt = time.perf_counter() - t
    n = 0
    for row in out[:, width:].tolist():
        n += next((i for i, x in enumerate(row) if x in (tok.eos_token_id, pad)), len(row))
    return n, dt


def _engine_run(
    engine: Engine, prompts: list[list[int]], max_new: int, adapters: list | None = None
) -> tuple[int, float, float]:
    """(completion tokens, seconds, decode-only tokens/s) for prompts submitted together."""
    params = SamplingParams(temperature=0, max_new_tokens=max_new)
    t = time.perf_counter()
    handles = [
        engine.submit(p, params, a, block=True)
        for p, a in zip(prompts, adapters or [None] * len(prompts), strict=True)
    ]
    results = [h.result() for h in handles]
    dt = time.perf_counter() - t
    n = sum(r.completion_tokens for r in results)
    first = min(h.t_first for h in handles)
    last = max(h.t_done for h in handles)
    decode = (n - len(handles)) / (last - first) if last > first else 0.0
    return n, dt, decode


def run_bench(
    model: str | None = None,
    adapters: int = 4,
    max_new_tokens: int = 128,
    streams: int = 8,
    dtype: str | None = None,
    adapter_dirs: list[str] | None = None,
    switch_rounds: int = 40,
    repeats: int = 3,
    progress=print,
) -> BenchResult:
    from loraforge.models import DEFAULT_MODEL, load_model, resolve_model

    spec = model or DEFAULT_MODEL
    engine = Engine(spec, dtype=dtype, max_batch=max(streams, 1))
    tok = engine.tokenizer
    hf_dtype = str(engine.dtype).split(".")[-1]  # int4 is compared with HF in bf16
    res = BenchResult(spec, "int4" if engine.int4 else hf_dtype, max_new_tokens, machine_info())
    # other processes on a small machine change every figure: record how busy it was
    res.machine["loadavg"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    prompts = [
        engine.encode([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
        for i in range(streams)
    ]
    try:
        # HF runs on the engine's own thread, between the engine's runs: torch work on a second
        # thread would slow whichever side runs next (see Engine.run_on_worker)
        hf = engine.run_on_worker(
            lambda: load_model(spec, dtype=hf_dtype, device=str(engine.device))
        )
        # warm both paths (first calls allocate caches / pick kernels)
        _engine_run(engine, prompts[:1], 4)
        engine.run_on_worker(lambda: _hf_generate(hf, tok, prompts[:1], 4))

        progress("one stream...")
        res.single = _compare(engine, hf, tok, prompts[:1], max_new_tokens, repeats)
        progress(f"{streams} streams...")
        res.batch = {
            "streams": streams,
            **_compare(engine, hf, tok, prompts, max_new_tokens, repeats),
        }
        hf = None  # free it before the adapter part

        progress("adapter switch...")
        with tempfile.TemporaryDirectory() as tmp:
            dirs = adapter_dirs or make_random_adapters(
                resolve_model(spec), spec, adapters, Path(tmp)
            )
            names = [f"a{i}" for i in range(len(dirs))]
            for name, d in zip(names, dirs, strict=True):
                engine.load_adapter(name, str(d))
            res.adapter_switch = _switch_bench(engine, names, prompts[0], switch_rounds)
    finally:
        engine.close()
    return res


def _compare(engine: Engine, hf, tok, prompts: list[list[int]], max_new: int, repeats: int) -> dict:
    """Engine and HF runs alternated ``repeats`` times; the best run of each is kept, because on
    a shared machine other processes only ever make a run slower."""
    eng, ref = [], []
    for _ in range(max(repeats, 1)):
        eng.append(_engine_run(engine, prompts, max_new))
        ref.append(engine.run_on_worker(lambda: _hf_generate(hf, tok, prompts, max_new)))
    n, dt, dec = max(eng, key=lambda r: r[0] / r[1])
    hn, hdt = max(ref, key=lambda r: r[0] / r[1])
    return {
        "repeats": len(eng),
        "engine_tokens": n,
        "engine_s": dt,
        "engine_tps": n / dt,
        "engine_decode_tps": dec,
        "engine_tps_all": [r[0] / r[1] for r in eng],
        "hf_tokens": hn,
        "hf_s": hdt,
        "hf_tps": hn / hdt,
        "hf_tps_all": [r[0] / r[1] for r in ref],
        "speedup": (n / dt) / (hn / hdt),
    }


def _switch_bench(engine: Engine, names: list[str], prompt: list[int], rounds: int) -> dict:
    runner = engine.runner
    prep = []
    for i in range(rounds):  # the work a switch costs: gathering that adapter's weights
        runner.clear_lora_cache()
        t = time.perf_counter()
        runner.lora_rows((names[i % len(names)],))
        prep.append((time.perf_counter() - t) * 1e3)
    params = SamplingParams(temperature=0, max_new_tokens=1)
    short = prompt[-16:]

    def ttft(seq: list[str]) -> list[float]:
        out = []
        for name in seq:
            h = engine.submit(short, params, name, block=True)
            h.result()
            out.append((h.t_first - h.t_submit) * 1e3)
        return out

    switching = ttft([names[i % len(names)] for i in range(rounds)])
    same = ttft([names[0]] * rounds)
    q = statistics.quantiles
    return {
        "adapters_loaded": len(names),
        "switch_p50_ms": statistics.median(prep),
        "switch_p95_ms": q(prep, n=20)[-1],
        "ttft_switch_p50_ms": statistics.median(switching),
        "ttft_switch_p95_ms": q(switching, n=20)[-1],
        "ttft_same_p50_ms": statistics.median(same),
        "ttft_same_p95_ms": q(same, n=20)[-1],
    }


TABLE_HEADER = [
    "| date (UTC) | machine | model, dtype, new tokens | 1 stream tok/s (× HF generate) "
    "| 8 streams tok/s (× HF generate) | adapter switch p50 / p95 ms | TTFT switch / same ms |",
    "|---|---|---|---|---|---|---|",
]


def markdown_row(r: BenchResult) -> str:
    s, b, a = r.single, r.batch, r.adapter_switch
    return (
        f"| {machine_description(r.machine)}, load avg {r.machine.get('loadavg', '?')} "
        f"| {r.model}, {r.dtype}, {r.max_new_tokens} "
        f"| {s['engine_tps']:.1f} (×{s['speedup']:.2f}) "
        f"| {b['engine_tps']:.1f} (×{b['speedup']:.2f}, {b['streams']} streams) "
        f"| {a['switch_p50_ms']:.2f} / {a['switch_p95_ms']:.2f} ({a['adapters_loaded']} loaded) "
        f"| {a['ttft_switch_p50_ms']:.1f} / {a['ttft_same_p50_ms']:.1f} |"
    )


def append_markdown(r: BenchResult, path: Path) -> None:
    append_row(path, "generate", TABLE_HEADER, markdown_row(r))


def write_json(r: BenchResult, path: Path) -> None:
    path.write_text(json.dumps(asdict(r), indent=2))


def print_result(res: BenchResult) -> None:
    from rich.table import Table

    from loraforge.console import console

    s, b, a = res.single, res.batch, res.adapter_switch
    title = f"{res.model} ({res.dtype}), {res.machine['cpu']}"
    table = Table("figure", "engine", "HF generate", "engine / HF", title=title)
    for label, d in (("1 stream tok/s", s), (f"{b['streams']} streams tok/s", b)):
        engine = f"{d['engine_tps']:.1f} (decode {d['engine_decode_tps']:.1f})"
        table.add_row(label, engine, f"{d['hf_tps']:.1f}", f"{d['speedup']:.2f}×")
    switch = f"{a['switch_p50_ms']:.2f} / {a['switch_p95_ms']:.2f}"
    table.add_row(f"adapter switch ms p50/p95 ({a['adapters_loaded']} loaded)", switch, "", "")
    ttft = f"{a['ttft_switch_p50_ms']:.1f} / {a['ttft_same_p50_ms']:.1f}"
    table.add_row("TTFT ms p50 (switching / same adapter)", ttft, "", "")
    console.print(table)
