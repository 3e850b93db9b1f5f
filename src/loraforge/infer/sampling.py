"""Sampling parameters, per-request token sampling, and incremental detokenisation with stops."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

# The validated, user-facing form of these settings (the CLI flags, serve and webui), whose
# to_params() makes a SamplingParams; defined in loraforge.config so the CLI reads its fields
# without importing torch.
from loraforge.config import SamplingOptions as SamplingOptions
from loraforge.infer.constrain import GrammarSpec


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
    # OpenAI's: added to the raw logits (id -> -100..100; +100 forces a token, -100 bans it)
    logit_bias: dict[int, float] = field(default_factory=dict)
    # OpenAI's, over the tokens generated so far (not the prompt): minus presence_penalty for a
    # token that occurred, minus frequency_penalty times its count
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0  # vLLM's: drop tokens below min_p x the top token's probability
    grammar: GrammarSpec | None = None  # constrained decoding (infer/constrain.py); None: free
    # None: off; k >= 0: each completion token's logprob and the k likeliest (infer/logprobs.py)
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (echo); costs a prefill
    # in chunks of logprobs.PROMPT_LOGPROBS_CHUNK with every position's logits


@dataclass
class GenerationResult:
    text: str  # decoded completion, without the end-of-turn token / stop string
    token_ids: list[int]  # completion token ids (end-of-turn token excluded)
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    # a logprobs.TokenLogprob per token of token_ids, and the stop token's that ended it, if any
    # (as vLLM's: a scorer asking for one token needs an entry even when that one is EOS)
    logprobs: list | None = None
    prompt_logprobs: list | None = None  # one per prompt token (the first: logprob None)


def choice_params(p: SamplingParams, i: int) -> SamplingParams:
    """Choice ``i`` of ``n`` (OpenAI's ``n``): with a seed it samples with seed + i, so the
    choices differ and each is reproducible (vLLM gives them one generator; loraforge's are per
    request, whatever is batched)."""
    if i == 0 or p.seed is None:
        return p
    return replace(p, seed=(p.seed + i + 2**63) % 2**64 - 2**63)  # stays an int64


def is_greedy(p: SamplingParams) -> bool:
    """The row's token is the argmax of its raw (masked) logits: nothing reshapes them."""
    return p.temperature <= 0 and not reshapes(p)


def reshapes(p: SamplingParams) -> bool:
    """Whether a setting moves scores relative to each other before the argmax / draw."""
    return bool(
        p.repetition_penalty != 1.0 or p.logit_bias or p.presence_penalty or p.frequency_penalty
    )


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
    logits: torch.Tensor,
    p: SamplingParams,
    gen: torch.Generator | None,
    history: list[int],
    generated: Sequence[int] = (),
) -> int:
    """One token from a row of float32 logits [V], like HF's logits processors in HF's order."""
    scores = warp(logits, p, history, generated)
    if p.temperature < MIN_TEMPERATURE:
        return int(scores.argmax())
    probs = scores.softmax(-1).cpu()
    if not torch.isfinite(probs).all():  # every score was -inf: nothing left to draw from
        raise ValueError("no token left to sample from (all scores are -inf)")
    return int(torch.multinomial(probs, 1, generator=gen))


def warp(
    logits: torch.Tensor, p: SamplingParams, history: list[int], generated: Sequence[int] = ()
) -> torch.Tensor:
    """The scores tokens are drawn from: logit bias, repetition penalty, presence and frequency
    penalties (vLLM's order), then temperature, top-k, top-p, min-p, in the order and with the
    arithmetic of HF's logits processors (tested against them). ``history`` is what the
    repetition penalty sees (prompt and completion, as HF), ``generated`` the completion only
    (OpenAI's penalties). Scores an extreme setting pushes past float range are clamped, never
    left NaN; a token the grammar masked (-inf) stays masked whatever its bias."""
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), device=logits.device)
        bias = torch.tensor(list(p.logit_bias.values()), device=logits.device)
        keep = ids < logits.shape[-1]  # an id past the vocabulary biases nothing
        logits = logits.index_add(0, ids[keep], bias[keep].to(logits.dtype))
    if p.repetition_penalty != 1.0 and history:
        ids = torch.tensor(history, device=logits.device)
        score = logits.gather(0, ids)
        score = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
        logits = logits.scatter(0, ids, score)
    if (p.presence_penalty or p.frequency_penalty) and generated:
        ids, counts = torch.tensor(list(generated), device=logits.device).unique(return_counts=True)
        penalty = counts.to(logits.dtype) * p.frequency_penalty + p.presence_penalty
        logits = logits.index_add(0, ids, -penalty)
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
    if p.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
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
