"""Sampling parameters, per-request token sampling, and incremental detokenisation with stops."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

# The validated, user-facing form of these settings (the CLI flags, serve and webui), whose
# to_params() makes a SamplingParams; defined in loraforge.config so the CLI reads its fields
# without importing torch.
from loraforge.config import SamplingOptions as SamplingOptions


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 -> off
    repetition_penalty: float = 1.0
    seed: int | None = None  # per-request generator: same seed -> same sample, whatever is batched
    stop: list[str] = field(
        default_factory=list
    )  # extra stop strings (EOS/end-of-turn always stop)


@dataclass
class GenerationResult:
    text: str  # decoded completion, without the end-of-turn token / stop string
    token_ids: list[int]  # completion token ids (end-of-turn token excluded)
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int


def is_greedy(p: SamplingParams) -> bool:
    return p.temperature <= 0 and p.repetition_penalty == 1.0


def make_generator(p: SamplingParams) -> torch.Generator | None:
    """A CPU generator per sampling request: its draws do not depend on what else is batched."""
    if p.temperature <= 0:
        return None
    g = torch.Generator()
    g.manual_seed(p.seed if p.seed is not None else random.getrandbits(63))
    return g


# Below this a temperature is greedy (vLLM's rule): dividing by it would overflow the scores.
MIN_TEMPERATURE = 1e-5


def sample(
    logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None, history: list[int]
) -> int:
    """One token from a row of float32 logits [V], like HF's logits processors in HF's order."""
    scores = warp(logits, p, history)
    if p.temperature < MIN_TEMPERATURE:
        return int(scores.argmax())
    probs = scores.softmax(-1).cpu()
    if not torch.isfinite(probs).all():  # every score was -inf: nothing left to draw from
        raise ValueError("no token left to sample from (all scores are -inf)")
    return int(torch.multinomial(probs, 1, generator=gen))


def warp(logits: torch.Tensor, p: SamplingParams, history: list[int]) -> torch.Tensor:
    """The scores tokens are drawn from: repetition penalty, temperature, top-k, top-p, in the
    order and with the arithmetic of HF's logits processors (tested against them). Scores an
    extreme setting pushes past float range are clamped, never left NaN."""
    if p.repetition_penalty != 1.0 and history:
        ids = torch.tensor(history, device=logits.device)
        score = logits.gather(0, ids)
        score = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
        logits = logits.scatter(0, ids, score)
    if p.temperature < MIN_TEMPERATURE:
        return _finite(logits)
    logits = _finite(logits / p.temperature)
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - p.top_p
        drop[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def _finite(x: torch.Tensor) -> torch.Tensor:
    big = torch.finfo(x.dtype).max
    return torch.nan_to_num(x, nan=float("-inf"), posinf=big, neginf=float("-inf"))


class TextTracker:
    """Turns generated ids into text deltas that never split a UTF-8 character, and applies the
    stop strings: text that could be the start of a stop string is held back until it is not."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tok = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were decoded last time (context for the next token)
        self.read = 0
        self.text = ""  # all decoded text (cut at a stop string once one is seen)
        self.sent = 0  # characters of self.text already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Add one id; return the text that is now safe to show."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
            self._check_stop()
        return self._release(final=False)

    def _check_stop(self) -> None:
        if not self.stops:
            return
        start = max(0, self.sent - max(len(s) for s in self.stops))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not final and not self.stopped:
            for s in self.stops:  # hold back a tail that may grow into a stop string
                for n in range(min(len(s) - 1, end - self.sent), 0, -1):
                    if self.text.endswith(s[:n]):
                        end = min(end, len(self.text) - n)
                        break
        delta = self.text[self.sent : end]
        self.sent = end
        return delta

    def finish(self) -> str:
        """Flush what is left (an incomplete character at the very end is dropped)."""
        if not self.stopped and self.read < len(self.ids):
            rest = self._decode(self.ids[self.prefix :])[
                len(self._decode(self.ids[self.prefix : self.read])) :
            ]
            self.text += rest.rstrip("\ufffd")
            self._check_stop()
        return self._release(final=True)
