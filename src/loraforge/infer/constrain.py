"""Constrained decoding: what a request's output must be (a ``GrammarSpec``), compiled once per
distinct spec and tokenizer, and a per-request ``Matcher`` the scheduler uses to mask each
constrained row's logits inside the shared batch. ``response_format`` (serve) and forced tool
calls (``tool_choice``) both build their specs here.

The engine is llguidance, chosen by measurement (``python -m loraforge.bench.grammar``: bundled
tokenizer, 49,152 tokens, 2 CPU cores shared with other work, 2026-12-03):
- correctness: both llguidance 1.9.1 and xgrammar 0.2.9 enforce required, enum, nested objects,
  min/maxItems, anyOf, $ref/$defs, additionalProperties false, format, pattern and multipleOf
  (each checked: a breaking output is rejected). On ``not`` and ``uniqueItems`` llguidance
  refuses the schema ("Unimplemented keys: ["not"]", our 400 naming the keyword) while xgrammar
  compiles it and ignores the keyword (also look-arounds in patterns): its output can break the
  schema while the request got 200.
- cost: mask per token 47 µs median for llguidance, 6 µs for xgrammar; applying a mask to a
  logits row ≈ 0.4 ms; a decode step of the bundled model is ≈ 40-70 ms, so either is ≈ 1 %
  and correctness decided. A schema compiles in ≈ 10 ms, once per distinct spec (LRU). The
  tokenizer table is built once per tokenizer: ≈ 2 s quiet (14 s on the loaded machine).
llguidance is imported lazily, only when a request is constrained (the ``serve`` extra).
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from loraforge.errors import UserError, require


class GrammarError(UserError):
    """A schema the grammar engine cannot compile; the message names the keyword."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a constrained output must be. Frozen and hashable: the compile cache's key.

    ``kind``: "json_object" (any JSON object), "json_schema" (one schema) or "tagged" (literal
    ``begin``, one JSON value matching any of ``schemas``, literal ``end``). Schemas are kept as
    compact JSON text so equal schemas share one compiled grammar; their key order is kept, as
    it is the order the properties are written in (OpenAI's structured outputs follow it)."""

    kind: str
    schemas: tuple[str, ...] = ()
    strict: bool = True
    begin: str = ""
    end: str = ""


def _canonical(schema: dict) -> str:
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    # Not sort_keys: sorted, a forced tool call came out {"arguments": ..., "name": ...}, not in
    # the order the model was trained to write, and a response_format object not in the schema's.
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def json_object() -> GrammarSpec:
    """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
    return GrammarSpec("json_object", (_canonical({"type": "object"}),))


def json_schema(schema: dict, strict: bool = True) -> GrammarSpec:
    """A JSON value matching ``schema``. The schema is enforced whether or not ``strict`` is set
    (vLLM's behaviour); ``strict`` is kept so that callers can report it."""
    return GrammarSpec("json_schema", (_canonical(schema),), strict=strict)


def tagged(begin: str, schemas: list[dict], end: str) -> GrammarSpec:
    """Literal ``begin``, one JSON value matching any of ``schemas``, literal ``end`` (Qwen's
    ``<tool_call>\\n`` ... ``\\n</tool_call>``; both "" for Llama-3 style bare JSON calls)."""
    if not schemas:
        raise GrammarError("a tagged grammar needs at least one schema")
    return GrammarSpec("tagged", tuple(_canonical(s) for s in schemas), begin=begin, end=end)


# Compact JSON (no free whitespace): with whitespace allowed, a model under a grammar can emit
# newlines forever and run out its max_tokens mid-object (the loop vLLM's
# "disable-any-whitespace" option exists for), which a compact grammar rules out.
_COMPACT = {"whitespace_flexible": False}


def _lark(spec: GrammarSpec) -> str:
    """The spec as llguidance's Lark dialect (``%json`` embeds a JSON schema)."""
    bodies = []
    for text in spec.schemas:
        schema = json.loads(text)
        schema.setdefault("x-guidance", _COMPACT)
        bodies.append("%json " + json.dumps(schema, ensure_ascii=False))
    parts = [json.dumps(spec.begin, ensure_ascii=False)] if spec.begin else []
    parts.append("body")
    if spec.end:
        parts.append(json.dumps(spec.end, ensure_ascii=False))
    return f"start: {' '.join(parts)}\nbody: " + " | ".join(bodies) + "\n"


def _one_line(message: str) -> str:
    """llguidance's error with the Lark source excerpt dropped: "failed to compile JSON schema:
    Unimplemented keys: ["not"]" is what the caller needs to see."""
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    if ": " in first and first.startswith("at "):  # "at 2(7): failed to ..." -> position dropped
        first = first.split(": ", 1)[1]
    return first


_lock = threading.Lock()
_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # hf tok -> LLTokenizer
_compiled: OrderedDict = OrderedDict()  # (spec, id(LLTokenizer)) -> a pristine LLMatcher
CACHE_SIZE = 64


def _ll_tokenizer(tokenizer):
    require("llguidance", "serve")
    import llguidance.hf

    with _lock:
        ll = _tokenizers.get(tokenizer)
        if ll is None:  # ≈ 2 s for a 49k vocabulary: once per tokenizer
            ll = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer))
            _tokenizers[tokenizer] = ll
        return ll


def _template(spec: GrammarSpec, tokenizer):
    """The compiled matcher for ``spec`` (LRU, one per distinct spec and tokenizer)."""
    import llguidance

    ll = _ll_tokenizer(tokenizer)
    key = (spec, id(ll))
    with _lock:
        hit = _compiled.get(key)
        if hit is not None and hit[0] is ll:
            _compiled.move_to_end(key)
            return hit[1]
    matcher = llguidance.LLMatcher(ll, llguidance.LLMatcher.grammar_from_lark(_lark(spec)))
    if matcher.is_error():
        raise GrammarError(f"schema not supported: {_one_line(matcher.get_error())}")
    with _lock:
        _compiled[key] = (ll, matcher)
        while len(_compiled) > CACHE_SIZE:
            _compiled.popitem(last=False)
    return matcher


def check(spec: GrammarSpec, tokenizer) -> None:
    """Compile ``spec`` now (cached), so a server can refuse a bad schema before queueing."""
    _template(spec, tokenizer)


_SHIFTS = torch.arange(32, dtype=torch.int32)


class Matcher:
    """One request's position in its grammar. ``mask_`` a logits row before sampling, then
    ``accept`` the sampled token; ``complete`` once nothing but end-of-turn can follow.

    End-of-turn (``stop_ids``, which may be several: <|im_end|>, <|eot_id|>, EOS) is allowed
    exactly when the grammar is complete so far, whatever the tokenizer's own EOS is."""

    def __init__(self, spec: GrammarSpec, tokenizer, stop_ids: set[int]):
        import llguidance.torch

        self._fill = llguidance.torch.fill_next_token_bitmask
        self.spec = spec
        self._m = _template(spec, tokenizer).deep_copy()
        self.vocab = len(tokenizer)
        self._bitmask = llguidance.torch.allocate_token_bitmask(1, self.vocab)
        self._stop = torch.tensor(sorted(stop_ids), dtype=torch.long)
        self._forbidden: torch.Tensor | None = None
        self._next()

    def _next(self) -> None:
        self._fill(self._m, self._bitmask, 0)
        bits = (self._bitmask[0].unsqueeze(-1) >> _SHIFTS) & 1
        forbidden = (bits == 0).flatten()[: self.vocab].clone()
        stop = self._stop[self._stop < self.vocab]
        forbidden[stop] = not self._m.is_accepting()
        self._forbidden = forbidden

    @property
    def complete(self) -> bool:
        """The output so far is a whole match and no other token may follow."""
        return self._m.is_stopped()

    def mask_(self, scores: torch.Tensor) -> None:
        """Set the scores of tokens the grammar forbids next to -inf, in place ([V] row; a
        model vocabulary wider than the tokenizer's has its extra rows forbidden too)."""
        forbidden = self._forbidden.to(scores.device)
        if scores.shape[-1] > self.vocab:
            scores[self.vocab :] = float("-inf")
            scores = scores[: self.vocab]
        scores.masked_fill_(forbidden[: scores.shape[-1]], float("-inf"))

    def accept(self, token_id: int) -> None:
        """Advance past ``token_id`` (one the mask allowed)."""
        if not self._m.consume_token(token_id):
            raise GrammarError(f"token {token_id} breaks the grammar: {self._m.get_error()}")
        if not self._m.is_stopped():
            self._next()


def matcher(spec: GrammarSpec, tokenizer, stop_ids: set[int]) -> Matcher:
    """A fresh matcher for one request (compiling ``spec`` if it is not cached)."""
    return Matcher(spec, tokenizer, stop_ids)
