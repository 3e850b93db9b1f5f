"""Constrained decoding (infer/constrain.py): the specs, the matcher on the real tokenizer, and
the engine masking constrained rows inside a batch that also runs free and adapter rows."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_adapter

pytest.importorskip("llguidance", reason="the serve extra's grammar engine is not installed")

from loraforge.infer import constrain  # noqa: E402
from loraforge.infer.engine import Engine, SamplingParams  # noqa: E402

# every value bounded, so that even a random model finishes the object within max_new_tokens
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "minItems": 1, "maxItems": 3},
        "where": {
            "type": "object",
            "properties": {"x": {"anyOf": [{"type": "boolean"}, {"enum": [1, 2]}]}},
            "required": ["x"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "count", "ok", "colour", "tags", "where"],
    "additionalProperties": False,
    "$defs": {"tag": {"enum": ["a", "b"]}},
}
STOP = {0, 2}  # <|endoftext|>, <|im_end|>


def _valid(text: str, schema: dict = SCHEMA) -> dict:
    value = json.loads(text)
    try:
        import jsonschema
    except ImportError:  # the required keys at least
        assert set(schema.get("required", ())) <= set(value)
    else:
        jsonschema.validate(value, schema)
    return value


def test_specs_are_hashable_and_keep_key_order():
    a = constrain.json_schema({"type": "object", "required": ["x"]})
    b = constrain.json_schema({"type": "object", "required": ["x"]})
    assert a == b and hash(a) == hash(b)  # equal schemas share one compiled grammar
    c = constrain.json_schema({"required": ["x"], "type": "object"})
    assert a != c  # the key order is the order properties are written in
    assert a != constrain.json_object()
    t = constrain.tagged("<tool_call>\n", [SCHEMA, {"type": "object"}], "\n</tool_call>")
    assert t.kind == "tagged" and len(t.schemas) == 2


def test_a_schema_the_engine_cannot_compile_names_the_keyword(tokenizer):
    with pytest.raises(constrain.GrammarError, match='"not"'):
        constrain.check(constrain.json_schema({"type": "object", "not": {}}), tokenizer)
    with pytest.raises(constrain.GrammarError, match="uniqueItems"):
        constrain.check(constrain.json_schema({"type": "array", "uniqueItems": True}), tokenizer)


def _walk(spec, tokenizer, seed: int, steps: int = 200) -> tuple[str, list[bool]]:
    """Sample random logits under the mask; (text, whether a stop token was allowed per step)."""
    gen = torch.Generator().manual_seed(seed)
    m = constrain.matcher(spec, tokenizer, STOP)
    ids, stop_allowed = [], []
    for _ in range(steps):
        scores = torch.randn(len(tokenizer), generator=gen) * 5
        m.mask_(scores)
        stop_allowed.append(bool(torch.isfinite(scores[sorted(STOP)]).any()))
        tok = int(torch.multinomial(scores.softmax(-1), 1, generator=gen))
        assert tok not in STOP  # forbidden until complete, and complete ends the walk
        ids.append(tok)
        m.accept(tok)
        if m.complete:
            return tokenizer.decode(ids), stop_allowed
    raise AssertionError(f"not complete after {steps} tokens: {tokenizer.decode(ids)!r}")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_scores_under_the_mask_give_a_valid_document(tokenizer, seed):
    text, stop_allowed = _walk(constrain.json_schema(SCHEMA), tokenizer, seed)
    assert list(_valid(text)) == list(SCHEMA["properties"])  # written in the schema's order
    assert not any(stop_allowed)  # end-of-turn only once the object is whole


def test_tagged_output_is_begin_one_call_end(tokenizer):
    call = {
        "type": "object",
        "properties": {"name": {"const": "get"}, "arguments": SCHEMA},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        "$defs": SCHEMA["$defs"],  # a $ref resolves against the root schema
    }
    text, _ = _walk(constrain.tagged("<tool_call>\n", [call], "\n</tool_call>"), tokenizer, 3)
    assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>")
    value = _valid(text[len("<tool_call>\n") : -len("\n</tool_call>")], call)
    assert list(value) == ["name", "arguments"]  # as the model was trained to write a call


def test_a_stop_token_is_allowed_once_the_value_may_end(tokenizer):
    m = constrain.matcher(constrain.json_schema({"type": "integer"}), tokenizer, STOP)
    m.accept(tokenizer.convert_tokens_to_ids("4"))  # "4" may end here or go on ("42")
    scores = torch.zeros(len(tokenizer))
    m.mask_(scores)
    assert torch.isfinite(scores[[0, 2]]).all() and not m.complete


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    adapter = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("ad") / "a1", 1)
    eng = Engine(str(tiny_model_dir), {"a1": str(adapter)}, dtype="float32")
    yield eng
    eng.close()


def test_constrained_free_and_adapter_rows_share_one_batch(engine):
    msgs = [{"role": "user", "content": "Describe a thing as JSON."}]
    spec = constrain.json_schema(SCHEMA)
    free = SamplingParams(temperature=0, max_new_tokens=24)
    cases = [  # (params, adapter)
        (SamplingParams(temperature=0, max_new_tokens=120, grammar=spec), None),
        (free, None),
        (SamplingParams(temperature=1.0, seed=5, max_new_tokens=120, grammar=spec), "a1"),
        (free, "a1"),
    ]
    alone = [engine.generate([msgs], p, a)[0] for p, a in cases]
    rows = []
    remove = engine.add_step_listener(lambda ev: rows.append(len(ev.adapters)))
    try:
        together = engine.generate([msgs] * 4, [p for p, _ in cases], [a for _, a in cases])
    finally:
        remove()
    assert max(rows) == 4  # the four requests ran as one batch
    for r in (together[0], together[2]):
        assert r.finish_reason == "stop", r.text
        _valid(r.text)
    # the mask touches only its own row: batched == alone, constrained and free alike
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert together[1].token_ids != together[3].token_ids  # the adapter row is the adapter's


def test_json_object_with_a_bias_ends_at_once(engine, tokenizer):
    # a random model writes keys forever; biasing "}" shows the mask and the bias compose: the
    # grammar still decides which tokens exist, the bias which of them wins
    bias = {tokenizer.convert_tokens_to_ids(t): 100 for t in ("{", "}")}
    p = SamplingParams(
        temperature=0, max_new_tokens=20, grammar=constrain.json_object(), logit_bias=bias
    )
    r = engine.generate([[{"role": "user", "content": "hi"}]], p)[0]
    assert r.finish_reason == "stop" and json.loads(r.text) == {}


def test_a_bad_schema_fails_at_submit(engine):
    bad = SamplingParams(grammar=constrain.json_schema({"not": {"type": "string"}}))
    with pytest.raises(constrain.GrammarError, match="not"):
        engine.submit([1, 2, 3], bad)
