"""Token log-probabilities: what the engine records per token, and the two shapes OpenAI's API
reports them in (chat's ``logprobs.content`` and the legacy completions' parallel lists).

Which scores: the log-softmax, in float32, of the logits the model produced for that position,
after the adapter and before anything the sampler does to them (repetition / presence /
frequency penalties, logit_bias, temperature, top-k / top-p / min-p, a grammar's mask). So a
token's logprob is the model's own, whatever sampling settings picked it, and a prompt's
logprobs (``echo``) are comparable with a scoring run of the model (lm-evaluation-harness).
vLLM reports the same by default (its ``logprobs_mode`` "raw_logprobs").
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch

# A request that wants its prompt's logprobs (echo) is prefilled in chunks of this many tokens:
# each chunk's full logits, [chunk, vocab] float32, exist only until its entries are taken.
# 128 x 49,152 x 4 bytes = 25 MB for the bundled model (77 MB at Qwen's 151,936).
PROMPT_LOGPROBS_CHUNK = 128


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the ``top`` most likely tokens at its position."""

    token: int
    logprob: float | None  # None: a prompt's first token (nothing before it to score it)
    top: tuple[tuple[int, float], ...] = ()  # (id, logprob), most likely first


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def entries(logprobs: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """One entry per row of ``logprobs`` [T, V] (log-softmaxed): row t scored ``tokens[t]``."""
    if not tokens:
        return []
    ids = torch.tensor(tokens, device=logprobs.device)[:, None]
    chosen = logprobs.gather(1, ids)[:, 0].tolist()
    if k > 0:
        top = torch.topk(logprobs, min(k, logprobs.shape[-1]), dim=-1)
        tops = [tuple(zip(i, v, strict=True)) for i, v in
                zip(top.indices.tolist(), top.values.tolist(), strict=True)]  # fmt: skip
    else:
        tops = [()] * len(tokens)
    return [TokenLogprob(t, lp, tp) for t, lp, tp in zip(tokens, chosen, tops, strict=True)]


# ---- token text ---------------------------------------------------------------------------------


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class TokenText:
    """A token's exact bytes and its text, for one tokenizer (``for_tokenizer`` caches it).

    ``decode([id])`` cannot give a token's bytes: a byte-level token holding half of a UTF-8
    character decodes to U+FFFD. The bytes come from the vocabulary entry itself: GPT-2's byte
    alphabet for byte-level BPE (SmolLM2, Llama 3, Qwen), ``<0xNN>`` byte tokens and ``▁`` for
    SentencePiece; special and added tokens are their text."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.byte_level = False
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self.byte_level = "ByteLevel" in json.dumps(json.loads(backend.to_str())["decoder"])
        self._cache: dict[int, bytes] = {}

    def bytes(self, token: int) -> bytes:
        got = self._cache.get(token)
        if got is None:
            got = self._cache[token] = self._bytes(token)
        return got

    def _bytes(self, token: int) -> bytes:
        piece = self.tok.convert_ids_to_tokens(token)
        if token not in self.special and isinstance(piece, str):
            if self.byte_level:
                table = _byte_decoder()
                if all(c in table for c in piece):
                    return bytes(table[c] for c in piece)
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return bytes([int(piece[3:5], 16)])
            else:
                return piece.replace("▁", " ").encode("utf-8")
        return self.tok.decode([token], skip_special_tokens=False).encode("utf-8")

    def text(self, token: int) -> str:
        """The token's text; a part of a UTF-8 character shows as U+FFFD (its bytes are exact)."""
        return self.bytes(token).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=8)
def for_tokenizer(tokenizer) -> TokenText:
    return TokenText(tokenizer)


# ---- OpenAI's shapes ----------------------------------------------------------------------------


def chat_logprobs(items: list[TokenLogprob], text: TokenText) -> dict:
    """Chat completions' ``choices[].logprobs``: {"content": [{token, logprob, bytes,
    top_logprobs: [{token, logprob, bytes}]}]}."""

    def one(token: int, logprob: float) -> dict:
        return {"token": text.text(token), "logprob": logprob, "bytes": list(text.bytes(token))}

    return {
        "content": [
            {**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
            for e in items
        ]
    }


def completion_logprobs(
    items: list[TokenLogprob], text: TokenText, offset: int = 0
) -> tuple[dict, int]:
    """Legacy completions' ``choices[].logprobs`` (tokens, token_logprobs, top_logprobs,
    text_offset) and the offset after the last token. With echo the prompt's first token has a
    null logprob and top. ``top_logprobs`` maps token text to logprob and holds the chosen token
    too, even with ``logprobs: 0``, as vLLM's does (lm-evaluation-harness compares the chosen
    token's logprob with ``max(top.values())`` to tell a greedy continuation)."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in items:
        piece = text.text(e.token)
        top = {text.text(t): lp for t, lp in e.top}
        if e.logprob is not None:
            top.setdefault(piece, e.logprob)
        out["tokens"].append(piece)
        out["token_logprobs"].append(e.logprob)
        out["top_logprobs"].append(top or None)
        out["text_offset"].append(offset)
        offset += len(piece)
    return out, offset
