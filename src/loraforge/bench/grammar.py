"""Which grammar engine constrained decoding uses, by measurement:
``python -m loraforge.bench.grammar [MODEL]`` (default: the bundled model's tokenizer).

For xgrammar and llguidance (whichever are installed), on the model's tokenizer:
- features: for each JSON Schema feature, whether the engine enforces it ("ok"), refuses it
  with an error ("refused", which a server can answer with a 400), or compiles while ignoring
  it ("IGNORED": the output may break the schema while the request got 200). "ok" is checked:
  the engine must reject a token sequence that breaks the keyword and accept one that keeps it;
- cost: per-token mask computation (median and worst) along a valid output, and the cost of
  applying a mask to one logits row.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from loraforge.errors import UserError

# feature -> (schema, an output that keeps it, an output that breaks it)
FEATURES: dict[str, tuple[dict, str, str]] = {
    "required": (
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        '{"a":1}',
        "{}",
    ),
    "enum": ({"enum": ["red", "green"]}, '"red"', '"blue"'),
    "nested objects": (
        {
            "type": "object",
            "properties": {
                "p": {"type": "object", "properties": {"q": {"type": "boolean"}}, "required": ["q"]}
            },
            "required": ["p"],
        },
        '{"p":{"q":true}}',
        '{"p":{"q":1}}',
    ),
    "minItems/maxItems": (
        {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2},
        "[1,2]",
        "[1,2,3]",
    ),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, "true", '"x"'),
    "$ref/$defs": (
        {"$defs": {"n": {"type": "integer"}}, "type": "array", "items": {"$ref": "#/$defs/n"}},
        "[1]",
        '["x"]',
    ),
    "additionalProperties false": (
        {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
        '{"a":1}',
        '{"b":1}',
    ),
    "format date": ({"type": "string", "format": "date"}, '"2026-12-03"', '"yesterday"'),
    "pattern": ({"type": "string", "pattern": "^[a-z]+$"}, '"abc"', '"ABC"'),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, "15", "7"),
    "not": ({"not": {"type": "string"}}, "1", '"x"'),
    "uniqueItems": ({"type": "array", "uniqueItems": True}, "[1,2]", "[1,1]"),
}


class _XGrammar:
    name = "xgrammar"

    def __init__(self, tok):
        import xgrammar as xgr

        self.xgr = xgr
        self.compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok))
        self.vocab = len(tok)

    def matcher(self, schema: dict):
        compiled = self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )
        m = self.xgr.GrammarMatcher(compiled)
        bitmask = self.xgr.allocate_token_bitmask(1, self.vocab)
        return m, (lambda: m.fill_next_token_bitmask(bitmask)), m.accept_token

    def complete(self, m) -> bool:
        return m.is_completed()


class _LLGuidance:
    name = "llguidance"

    def __init__(self, tok):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg, self.lt = llguidance, llguidance.torch
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=len(tok))
        self.vocab = len(tok)

    def matcher(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False}
        )
        m = self.llg.LLMatcher(self.tok, grammar)
        if m.is_error():
            raise ValueError(m.get_error().splitlines()[0])
        bitmask = self.lt.allocate_token_bitmask(1, self.vocab)
        return m, (lambda: self.lt.fill_next_token_bitmask(m, bitmask, 0)), m.consume_token

    def complete(self, m) -> bool:
        return m.is_accepting()


def _follows(engine, tok, schema: dict, text: str) -> bool:
    """Whether the engine accepts ``text``, token by token, as a whole output."""
    m, _, accept = engine.matcher(schema)
    return all(accept(t) for t in tok.encode(text, add_special_tokens=False)) and engine.complete(m)


def features(engine, tok) -> dict[str, str]:
    out = {}
    for feature, (schema, good, bad) in FEATURES.items():
        try:
            engine.matcher(schema)
        except Exception:  # noqa: BLE001 - a refusal is an answer
            out[feature] = "refused"
            continue
        ok = _follows(engine, tok, schema, good) and not _follows(engine, tok, schema, bad)
        out[feature] = "ok" if ok else "IGNORED"
    return out


COST_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "kind": {"enum": ["a", "b", "c"]},
    },
    "required": ["name", "age", "tags", "kind"],
    "additionalProperties": False,
}
COST_TEXT = '{"name":"Ada Lovelace","age":36,"tags":["math","poetry","engines"],"kind":"b"}'


def cost(engine, tok, rounds: int = 20) -> dict[str, float]:
    """Mask computation per token along COST_TEXT, microseconds (median, worst), and compile ms."""
    ids = tok.encode(COST_TEXT, add_special_tokens=False)
    times, compiles = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        _, fill, accept = engine.matcher(COST_SCHEMA)
        compiles.append(time.perf_counter() - t)
        for i in ids:
            t = time.perf_counter()
            fill()
            times.append(time.perf_counter() - t)
            accept(i)
    return {
        "mask_us_median": statistics.median(times) * 1e6,
        "mask_us_worst": max(times) * 1e6,
        "compile_ms_median": statistics.median(compiles) * 1e3,
    }


def apply_cost(vocab: int, rounds: int = 200) -> float:
    """loraforge's mask application (constrain.Matcher.mask_) on one float32 row, µs median."""
    from loraforge.infer.constrain import _SHIFTS

    bitmask = torch.randint(-(2**31), 2**31 - 1, (1, (vocab + 31) // 32), dtype=torch.int32)
    row, times = torch.randn(vocab), []
    for _ in range(rounds):
        t = time.perf_counter()
        allowed = ((bitmask[0].unsqueeze(-1) >> _SHIFTS) & 1).bool().flatten()[:vocab]
        row.masked_fill_(~allowed, float("-inf"))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def load_schema(path: str | Path) -> dict:
    """A JSON schema file, or one clear line saying what is wrong with it."""
    p = Path(path)
    try:
        schema = json.loads(p.read_text())
    except OSError as e:
        raise UserError(f"--json-schema: cannot read {p} ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"--json-schema: {p} line {e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(schema, dict):
        raise UserError(f"--json-schema: {p} must hold a JSON object (a schema)")
    return schema


def _decode_steps(engine, submit) -> tuple[list, list[float]]:
    """Run ``submit()`` (returns handles) to the end; (results, the time of each decode step
    that ran with every request still in the batch)."""
    events: list[tuple[float, str, int]] = []
    remove = engine.add_step_listener(
        lambda ev: events.append((time.perf_counter(), ev.kind, len(ev.adapters)))
    )
    try:
        handles = submit()
        results = [h.result() for h in handles]
    finally:
        remove()
    full = len(handles)
    steps = [
        t1 - t0
        for (t0, _, _), (t1, kind, rows) in zip(events, events[1:], strict=False)
        if kind == "decode" and rows == full
    ]
    return results, steps


def constrained_vs_free(
    model: str | None, schema: dict, streams: int = 8, max_new: int = 128, dtype=None
) -> dict:
    """``bench generate --json-schema``: one engine, one run. Figures: tokens/s of one free and
    one constrained stream, and the decode step time of ``streams`` rows all free, with one
    row constrained, and all constrained (steps counted only while every row still runs, so
    a constrained answer that ends early does not shrink the batch being timed)."""
    from loraforge.bench.generate import PROMPTS
    from loraforge.infer import constrain
    from loraforge.infer.engine import Engine, SamplingParams

    spec = constrain.json_schema(schema)
    engine = Engine(model, dtype=dtype, max_batch=max(streams, 1))
    try:
        constrain.check(spec, engine.tokenizer)  # the one-time tokenizer table, not timed
        asks = [f"{PROMPTS[i % len(PROMPTS)]} Answer as JSON." for i in range(streams)]
        prompts = [engine.encode([{"role": "user", "content": a}]) for a in asks]
        free = SamplingParams(temperature=0, max_new_tokens=max_new)
        bound = SamplingParams(temperature=0, max_new_tokens=max_new, grammar=spec)

        def run(params: list) -> tuple[list, list[float]]:
            return _decode_steps(
                engine,
                lambda: [
                    engine.submit(p, sp, block=True) for p, sp in zip(prompts, params, strict=False)
                ],
            )

        run([free])  # warm-up
        out: dict = {"streams": streams, "max_new_tokens": max_new}
        for name, params in (("one_free", [free]), ("one_constrained", [bound])):
            results, steps = run(params)
            out[name] = {
                "tokens_per_s": round(1 / statistics.median(steps), 1) if steps else None,
                "tokens": results[0].completion_tokens,
                "finish_reason": results[0].finish_reason,
            }
        mixes = {
            "all_free": [free] * streams,
            "one_constrained": [bound] + [free] * (streams - 1),
            "all_constrained": [bound] * streams,
        }
        for name, params in mixes.items():
            results, steps = run(params)
            ms = statistics.median(steps) * 1e3 if steps else None
            out[f"batch_{name}_step_ms"] = round(ms, 2) if ms else None
            out[f"batch_{name}_steps"] = len(steps)
        base = out["batch_all_free_step_ms"]
        for name in ("one_constrained", "all_constrained"):
            ms = out[f"batch_{name}_step_ms"]
            out[f"batch_{name}_slowdown_pct"] = (
                round(100 * (ms / base - 1), 1) if ms and base else None
            )
        out["sample_output"] = results[0].text[:200]  # a constrained answer (all_constrained)
        return out
    finally:
        engine.close()


def main(model: str = "smollm2-135m") -> None:
    from loraforge.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(model))
    print(f"tokenizer: {model}, vocabulary {len(tok)}")
    print(f"applying a mask to one logits row: {apply_cost(len(tok)):.0f} µs (median)")
    for cls in (_XGrammar, _LLGuidance):
        try:
            t = time.perf_counter()
            engine = cls(tok)
            setup = time.perf_counter() - t
        except ImportError:
            print(f"{cls.name}: not installed")
            continue
        feats = features(engine, tok)
        c = cost(engine, tok)
        n_ok = sum(v == "ok" for v in feats.values())
        print(
            f"\n{cls.name}: tokenizer table {setup:.2f} s, schema compile "
            f"{c['compile_ms_median']:.1f} ms, mask per token {c['mask_us_median']:.0f} µs "
            f"median / {c['mask_us_worst']:.0f} µs worst; features enforced {n_ok}/{len(feats)}"
        )
        for feature, verdict in feats.items():
            print(f"  {feature:28} {verdict}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
