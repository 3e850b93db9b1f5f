"""`loraforge eval`: loss/perplexity on a dataset, and an identity check by generation.

Loss is the mean cross-entropy over assistant tokens only (the labels training uses: the
end-of-turn token included), token-weighted over the whole dataset, with the adapter's recorded
chat template and system prompt. Perplexity is exp(loss).

The identity check asks a question set (built-in zh + en who-are-you questions phrased unlike
the training set's, or ``--questions FILE``) through the engine and reports the share of
answers containing the expected name (case-insensitive) and the share that ended with EOS
before the token limit (a tuned model that never stops is a classic label-mask bug).

The tool check (``--tools FILE``) asks every assistant turn of held-out tool-calling
conversations and scores the right function, the right arguments (exact JSON) and no call
where the data has none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.errors import UserError

IDENTITY_QUESTIONS = Path(__file__).parent / "data" / "builtin" / "identity_questions.jsonl"


@dataclass
class LossResult:
    loss: float
    perplexity: float
    tokens: int  # assistant (labelled) tokens scored
    examples: int
    skipped: int = 0  # unusable records left out (see `loraforge data doctor`)


@dataclass
class IdentityResult:
    name: str
    questions: int
    hit_rate: float  # share of answers containing the name
    eos_rate: float  # share of answers that ended with EOS before max_new_tokens
    by_tag: dict[str, float] = field(default_factory=dict)  # hit rate per tag (zh, en)
    answers: list[dict] = field(default_factory=list)  # {"question", "answer", "hit", "eos"}


def eval_loss(
    datasets: list[str],
    *,
    adapter: str | None = None,
    model: str | None = None,
    max_length: int | None = None,
    batch_size: int = 4,
    model_name: str | None = None,
    model_author: str | None = None,
    progress: bool = True,
    strict: bool = False,
) -> LossResult:
    """Token-weighted mean loss over assistant tokens of ``datasets`` (fp32, no dropout)."""
    import torch
    from rich.progress import Progress

    from loraforge.adapters import prompt_format, resolve_adapter
    from loraforge.console import err_console
    from loraforge.data import load_examples
    from loraforge.data.collate import pad_batch
    from loraforge.models import load_model, load_tokenizer
    from loraforge.train.loss import TokenMean, token_ce

    meta = resolve_adapter(adapter, model) if adapter else None
    base = meta.base_model if meta else model
    max_length = max_length or (meta.max_length if meta else None)
    tokenizer = load_tokenizer(base)
    template, system = prompt_format(meta, tokenizer)
    examples, report = load_examples(
        datasets,
        tokenizer,
        template=template,
        system=system,
        max_length=max_length,
        model_name=model_name,
        model_author=model_author,
        strict=strict,
    )
    for line in report.problem_lines(datasets):
        err_console.print(line, markup=False)
    net = load_model(base, dtype="float32")
    if adapter:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, adapter)
    net.eval()
    # Longest first: batches of similar length waste less padding.
    examples = sorted(examples, key=lambda e: -len(e.input_ids))
    scored = TokenMean()
    with torch.no_grad(), Progress(console=err_console, disable=not progress) as bar:
        task = bar.add_task("scoring", total=len(examples))
        for i in range(0, len(examples), batch_size):
            batch = pad_batch(examples[i : i + batch_size], tokenizer.pad_token_id)
            logits = net(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            scored.add(*token_ce(logits, batch["labels"]))
            bar.advance(task, len(batch["input_ids"]))
    if scored.count == 0:
        raise UserError("no assistant tokens to score in the dataset")
    loss = scored.mean
    return LossResult(loss, math.exp(min(loss, 700.0)), scored.count, len(examples), report.skipped)


def read_questions(path: str | Path | None = None, strict: bool = False) -> list[tuple[str, str]]:
    """(question, tag) pairs: the built-in identity set, or any file `infer` reads."""
    from loraforge.console import say
    from loraforge.data.inputs import read_inputs

    records = read_inputs(path or IDENTITY_QUESTIONS, strict, echo=say)
    return [(msgs[-1]["content"], str(rec.get("tag") or "")) for rec, msgs in records]


def eval_identity(
    engine,
    name: str,
    params,
    *,
    adapter: str | None = None,
    questions: str | None = None,
    strict: bool = False,
) -> IdentityResult:
    """Ask the question set and score the answers for ``name`` and for stopping on EOS."""
    if not name.strip():
        raise UserError("--expect-name: give a non-empty name")
    pairs = read_questions(questions, strict)
    prompts = [[{"role": "user", "content": q}] for q, _ in pairs]
    results = engine.generate(prompts, params, adapters=adapter)
    needle = name.strip().casefold()
    answers = []
    for (q, tag), res in zip(pairs, results, strict=True):
        answers.append(
            {
                "question": q,
                "tag": tag,
                "answer": res.text,
                "hit": needle in res.text.casefold(),
                "eos": res.finish_reason == "stop",
            }
        )
    n = len(answers)
    by_tag = {}
    for tag in sorted({a["tag"] for a in answers if a["tag"]}):
        group = [a for a in answers if a["tag"] == tag]
        by_tag[tag] = sum(a["hit"] for a in group) / len(group)
    return IdentityResult(
        name=name,
        questions=n,
        hit_rate=sum(a["hit"] for a in answers) / n,
        eos_rate=sum(a["eos"] for a in answers) / n,
        by_tag=by_tag,
        answers=answers,
    )


@dataclass
class ToolsResult:
    turns: int  # assistant turns asked
    call_turns: int  # turns where the data has a call
    answer_turns: int  # turns where it has none (a text answer is due)
    right_function: float  # of call_turns: the same function(s) called
    right_arguments: float  # of call_turns: same functions with exactly the same JSON arguments
    no_call: float  # of answer_turns: no call made
    answers: list[dict] = field(default_factory=list)  # {"expected", "called", "text"}


def eval_tools(
    engine, path: str, params, *, adapter: str | None = None, strict: bool = False
) -> ToolsResult:
    """Ask every assistant turn of held-out tool-calling conversations (the data's own history
    before it, its tools in the prompt) and read the answer back as the server does (a call
    counts only if its function is known and its arguments match the schema; tools.py)."""
    from loraforge.data import load_conversations
    from loraforge.tools import parse_calls, tool_style

    style = tool_style(engine.prompt_template(adapter))
    asks = []  # (conversation, turn index)
    for conv in load_conversations([path], strict=strict):
        asks += [(conv, i) for i, m in enumerate(conv.messages) if m["role"] == "assistant"]
    if not asks:
        raise UserError(f"{path}: no assistant turns to ask")
    prompts = [engine.encode(c.messages[:i], adapter, tools=c.tools) for c, i in asks]
    results = engine.generate(prompts, params, adapters=adapter)
    answers = []
    for (conv, i), res in zip(asks, results, strict=True):
        want = [
            {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            for c in conv.messages[i].get("tool_calls") or []
        ]
        _, got = parse_calls(style, res.text, conv.tools) if conv.tools else ("", [])
        answers.append({"expected": want, "called": got, "text": res.text})
    calls = [a for a in answers if a["expected"]]
    texts = [a for a in answers if not a["expected"]]

    def share(group: list[dict], ok) -> float:
        return sum(1 for a in group if ok(a)) / len(group) if group else 0.0

    def names(calls: list[dict]) -> list[str]:
        return [c["name"] for c in calls]

    return ToolsResult(
        turns=len(answers),
        call_turns=len(calls),
        answer_turns=len(texts),
        right_function=share(calls, lambda a: names(a["called"]) == names(a["expected"])),
        right_arguments=share(calls, lambda a: a["called"] == a["expected"]),
        no_call=share(texts, lambda a: not a["called"]),
        answers=answers,
    )
