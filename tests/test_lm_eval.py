"""lm-evaluation-harness scores a model through ``loraforge serve``: its ``local-completions``
model sends token-id prompts with ``echo`` and ``logprobs`` (the loglikelihood path of every
multiple-choice task), and each score equals direct fp32 scoring of the same tokens (the sum of
the continuation tokens' log-softmax given the context) within 1e-4."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import start_server

from loraforge.infer.engine import Engine
from loraforge.serve.app import create_app

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'lm-eval[api]')")
pytest.importorskip("tenacity", reason="lm-eval's API models need its [api] extra")

DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "London", "a small town"]},
    {"question": "Two plus two equals", "choices": ["four", "five"]},
]


def write_task(dir_) -> None:
    """A two-question multiple-choice task, read from a local JSONL file (no hub)."""
    data = dir_ / "data.jsonl"
    data.write_text("".join(json.dumps({**d, "answer": 0}) + "\n" for d in DOCS))
    (dir_ / "loraforge_tiny.yaml").write_text(
        "task: loraforge_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )


def direct_score(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's split of the pair into tokens (trailing spaces move to the continuation),
    scored by the HF model in fp32: (sum of logprobs, whether each token is the argmax)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    rows = lp[n_ctx - 1 : len(whole) - 1]
    cont = torch.tensor(whole[n_ctx:])
    score = rows.gather(1, cont[:, None]).sum().item()
    return score, bool((rows.argmax(-1) == cont).all())


def test_lm_eval_local_completions_scores_equal_direct_scoring(
    tiny_model_dir, tokenizer, tmp_path, monkeypatch
):
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_task(tmp_path)
    engine = Engine(str(tiny_model_dir), dtype="float32", max_batch=4)
    url, server, thread = start_server(create_app(engine))
    try:
        args = (
            f"base_url={url}/v1/completions,model={engine.base_name},"
            f"tokenizer={tiny_model_dir},tokenizer_backend=huggingface,max_retries=1,batch_size=2"
        )
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=args,
            tasks=["loraforge_tiny"],
            task_manager=TaskManager(include_path=str(tmp_path)),
            log_samples=True,
        )
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.close()
    samples = out["samples"]["loraforge_tiny"]
    assert sum(len(s["arguments"]) for s in samples) == 5  # every choice was scored
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for s in samples:
        for (context, continuation), [(score, greedy)] in zip(
            s["arguments"], s["resps"], strict=True
        ):
            want, want_greedy = direct_score(model, tokenizer, context, continuation)
            assert abs(score - want) < 1e-4, (context, continuation, score, want)
            assert greedy == want_greedy
