"""The engine's sampling against HF's logits processors on fixed logits, and extreme settings."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
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
    if p.min_p > 0:
        procs.append(MinPLogitsWarper(p.min_p))
    return procs(torch.tensor([HISTORY]), logits[None].clone())[0]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=0.9, top_p=0.8),
        SamplingParams(temperature=0.5, top_k=10, top_p=0.6, repetition_penalty=1.3),
        SamplingParams(temperature=1.0, repetition_penalty=0.7),
        SamplingParams(temperature=0.8, min_p=0.1),
        SamplingParams(temperature=0.5, top_k=10, top_p=0.9, min_p=0.05),
    ],
    ids=["temperature", "top_k", "top_p", "all", "penalty_below_1", "min_p", "all_min_p"],
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


def test_logit_bias_forces_and_bans_tokens():
    logits = torch.randn(V, generator=torch.Generator().manual_seed(3))
    top = int(logits.argmax())
    assert sample(logits, SamplingParams(temperature=0, logit_bias={11: 100}), None, []) == 11
    banned = SamplingParams(temperature=0, logit_bias={top: -100})
    assert sample(logits, banned, None, []) == int(logits.topk(2).indices[1])
    masked = logits.clone()
    masked[11] = float("-inf")  # a token a grammar masked stays masked whatever its bias
    assert sample(masked, SamplingParams(temperature=0, logit_bias={11: 100}), None, []) != 11


def test_presence_and_frequency_penalties_follow_openai():
    # OpenAI: mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty, where c counts
    # the tokens generated so far (the prompt does not count)
    logits = torch.randn(V, generator=torch.Generator().manual_seed(4))
    p = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25)
    out = warp(logits, p, history=[1, 2, 3], generated=[7, 7, 7, 12])
    expected = logits.clone()
    expected[7] -= 3 * 0.25 + 0.5
    expected[12] -= 0.25 + 0.5
    torch.testing.assert_close(out, expected)


def test_min_p_keeps_tokens_near_the_top():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.12, 0.05, 0.03]))
    kept = torch.isfinite(warp(logits, SamplingParams(temperature=1.0, min_p=0.2), []))
    assert kept.tolist() == [True, True, True, False, False]  # >= 0.2 x 0.5


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from loraforge.infer.engine import Engine

    eng = Engine(str(tiny_model_dir), dtype="float32")
    yield eng
    eng.close()


def _greedy(engine, **kw) -> list[int]:
    p = SamplingParams(temperature=0, max_new_tokens=24, **kw)
    return engine.generate([[{"role": "user", "content": "Say something."}]], p)[0].token_ids


def test_penalties_change_greedy_output_in_the_engine(engine):
    plain = _greedy(engine)
    assert len(set(plain)) < len(plain)  # the random model repeats itself
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalised = _greedy(engine, **kw)
        assert penalised != plain
        # a token's score falls by >= 2 per repeat, more than the tiny model's logits spread
        assert max(penalised.count(t) for t in penalised) < max(plain.count(t) for t in plain)
    assert set(_greedy(engine, logit_bias={42: 100})) == {42}
