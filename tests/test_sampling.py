"""The engine's sampling against HF's logits processors on fixed logits, and extreme settings."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from loraforge.infer.sampling import SamplingParams, sample, warp

V = 50
HISTORY = [3, 7, 7, 12]


def _hf(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    procs.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k > 0:
        procs.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        procs.append(TopPLogitsWarper(p.top_p))
    return procs(torch.tensor([HISTORY]), logits[None].clone())[0]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=0.9, top_p=0.8),
        SamplingParams(temperature=0.5, top_k=10, top_p=0.6, repetition_penalty=1.3),
        SamplingParams(temperature=1.0, repetition_penalty=0.7),
    ],
    ids=["temperature", "top_k", "top_p", "all", "penalty_below_1"],
)
def test_warp_equals_hf_logits_processors(params):
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0)) * 3
    ours, theirs = warp(logits, params, HISTORY), _hf(logits, params)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))  # the same tokens are kept
    kept = ~torch.isinf(theirs)
    torch.testing.assert_close(ours[kept], theirs[kept], rtol=1e-6, atol=1e-6)


def test_penalty_changes_the_greedy_choice():
    logits = torch.zeros(V)
    logits[7], logits[9] = 2.0, 1.5  # 7 leads, but it was said before
    greedy_penalised = SamplingParams(temperature=0, repetition_penalty=1.5)
    assert sample(logits, SamplingParams(temperature=0), None, HISTORY) == 7
    assert sample(logits, greedy_penalised, None, HISTORY) == 9


def test_same_seed_same_draws():
    logits = torch.randn(V, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=1.0)

    def draws(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return [sample(logits, p, g, []) for _ in range(20)]

    assert draws(5) == draws(5) and draws(5) != draws(6)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-300),
        SamplingParams(temperature=1.0, top_p=1e-300),
        SamplingParams(temperature=1.0, repetition_penalty=1e-300),
        SamplingParams(temperature=1.0, repetition_penalty=1e300),
    ],
    ids=["tiny_temperature", "tiny_top_p", "tiny_penalty", "huge_penalty"],
)
def test_extreme_settings_still_give_a_token(params):
    logits = torch.randn(V, generator=torch.Generator().manual_seed(2))
    tok = sample(logits, params, torch.Generator().manual_seed(0), HISTORY)
    assert 0 <= tok < V
    assert not torch.isnan(warp(logits, params, HISTORY)).any()
