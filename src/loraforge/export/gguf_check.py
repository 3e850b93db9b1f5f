"""The self-check of `export gguf`: the GGUF, run by llama.cpp, against loraforge itself.

Checked through llama.cpp (in a subprocess, see llamacpp.in_llama_cpp), on the few
conversations `merge` checks plus two everyday questions:
- the prompt text rendered from the chat template embedded in the GGUF, tokenized by llama.cpp
  with the BOS handling the GGUF declares, is token for token what loraforge's engine feeds the
  model (so template, system prompt, special tokens and BOS all survived the conversion);
- greedy answers from the same prompt ids, stopped by the GGUF's own end-of-generation tokens,
  against loraforge's engine (fp32): f16 must give the same tokens; a quantized file reports the
  share of answer tokens it matches before its first divergence;
- the perplexity of the answers of a small evaluation set (the last records of the built-in
  general set) against the merged model in transformers, fp32; it must not grow by more than a
  bound per type (MAX_PPL_INCREASE, or --max-ppl-increase).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.export.llamacpp import in_llama_cpp
from loraforge.export.merge import VERIFY_CONVERSATIONS

CHECK_CONVERSATIONS = [
    *VERIFY_CONVERSATIONS,
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Give me three tips for staying healthy."}],
]
MAX_NEW_TOKENS = 48
EVAL_RECORDS = 8  # the last 8 records of data/builtin/general.jsonl
# Max relative perplexity increase over fp32 transformers, about 3-5x what was measured on
# smollm2-135m (2026-12-03: f16 +0.00%, q8_0 +0.21%, q4_k_m +5.96%; README "Ship"): a small model
# loses more to 4 bits than the 7B+ models the usual figures are for.
MAX_PPL_INCREASE = {"f16": 0.01, "q8_0": 0.01, "q4_k_m": 0.15}


@dataclass
class CheckReport:
    quant: str
    prompts: int
    identical_answers: int
    match_share: float  # answer tokens matched before the first divergence / reference tokens
    ppl_reference: float
    ppl_gguf: float
    max_ppl_increase: float
    eos: str
    first_answer: tuple[str, str] = ("", "")  # (loraforge, llama.cpp) answers to prompt 1
    problems: list[str] = field(default_factory=list)

    @property
    def ppl_increase(self) -> float:
        return self.ppl_gguf / self.ppl_reference - 1

    def summary(self) -> str:
        return (
            f"llama.cpp vs loraforge engine: {self.identical_answers}/{self.prompts} greedy "
            f"answers identical, {self.match_share:.1%} of answer tokens match; perplexity "
            f"{self.ppl_gguf:.3f} vs {self.ppl_reference:.3f} fp32 "
            f"({self.ppl_increase:+.2%}, bound +{self.max_ppl_increase:.0%}); EOS {self.eos}"
        )


def check_gguf(
    gguf_path: Path, source, quant: str, *, max_ppl_increase: float | None = None
) -> CheckReport:
    """Run the checks above; raise GGUFExportError (nothing written) when one fails."""
    from loraforge.export.gguf import GGUFExportError

    bound = MAX_PPL_INCREASE[quant] if max_ppl_increase is None else max_ppl_increase
    prompts, reference, tokenizer = _engine_answers(source)
    texts = _render_with_gguf_template(gguf_path, tokenizer)
    evals = _eval_sequences(tokenizer, source)
    got = in_llama_cpp(
        {
            "op": "check",
            "gguf": str(gguf_path),
            "prompts": prompts,
            "max_new_tokens": MAX_NEW_TOKENS,
            "texts": texts,
            "nll": evals,
        },
        f"checking the {quant} GGUF",
    )
    report = CheckReport(
        quant=quant,
        prompts=len(prompts),
        identical_answers=sum(a == b for a, b in zip(reference, got["answers"], strict=True)),
        match_share=_match_share(reference, got["answers"]),
        ppl_reference=_perplexity(_reference_nll(source.model_dir, evals)),
        ppl_gguf=_perplexity(got["nll"]),
        max_ppl_increase=bound,
        eos=tokenizer.convert_ids_to_tokens(got["eos"]),
        first_answer=(tokenizer.decode(reference[0]), tokenizer.decode(got["answers"][0])),
    )
    for i, (want, have) in enumerate(zip(prompts, got["tokens"], strict=True)):
        if want != have:
            report.problems.append(
                f"prompt {i + 1} rendered from the GGUF's template and tokenized by llama.cpp "
                f"differs from loraforge's ({len(have)} vs {len(want)} tokens)"
            )
    if quant == "f16" and report.identical_answers < report.prompts:
        pairs = zip(reference, got["answers"], strict=True)
        i = next(i for i, (a, b) in enumerate(pairs) if a != b)
        report.problems.append(
            f"f16 greedy answer {i + 1} differs from loraforge's engine: "
            f"{tokenizer.decode(got['answers'][i])!r} vs {tokenizer.decode(reference[i])!r}"
        )
    if not report.ppl_increase <= bound:  # also catches NaN
        report.problems.append(
            f"perplexity {report.ppl_gguf:.4g} is {report.ppl_increase:+.1%} over fp32 "
            f"({report.ppl_reference:.4g}); bound +{bound:.0%}"
        )
    if report.problems:
        raise GGUFExportError(
            f"{gguf_path.name}: {report.problems[0]} ({report.summary()}); nothing written"
        )
    return report


def _engine_answers(source) -> tuple[list[list[int]], list[list[int]], object]:
    """(prompt ids, greedy answer ids, tokenizer) from loraforge's engine in fp32."""
    from loraforge.infer.engine import Engine
    from loraforge.infer.sampling import SamplingParams

    if source.adapter is not None:
        engine = Engine.from_adapter(str(source.adapter), name="tuned", dtype="float32")
        name = "tuned"
    else:
        engine = Engine(
            str(source.model_dir), dtype="float32", template=source.template, system=source.system
        )
        name = None
    with engine:
        prompts = [engine.encode(conv, name) for conv in CHECK_CONVERSATIONS]
        params = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS)
        results = engine.generate(prompts, params, name)
        return prompts, [r.token_ids for r in results], engine.tokenizer


def _render_with_gguf_template(gguf_path: Path, tokenizer) -> list[str]:
    """Each check conversation rendered by the chat template embedded in the GGUF, with no
    system message: the trained system prompt must come from the template itself."""
    from gguf import GGUFReader

    field_ = GGUFReader(gguf_path).fields.get("tokenizer.chat_template")
    if field_ is None:
        from loraforge.export.gguf import GGUFExportError

        raise GGUFExportError(f"{gguf_path.name}: no chat template embedded; nothing written")
    template = field_.contents()
    return [
        tokenizer.apply_chat_template(
            conv, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        for conv in CHECK_CONVERSATIONS
    ]


def _eval_sequences(tokenizer, source) -> list[list]:
    """[ids up to the last answer token, index of the first answer token] per evaluation
    conversation, rendered as training renders them."""
    from loraforge.data.sources import BUILTIN
    from loraforge.data.tokenize import IGNORE_INDEX, encode_conversation

    path = BUILTIN["general"]
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    out = []
    for rec in records[-EVAL_RECORDS:]:
        conv = [
            {"role": "user", "content": rec["instruction"]},
            {"role": "assistant", "content": rec["output"]},
        ]
        ex = encode_conversation(tokenizer, conv, template=source.template, system=source.system)
        scored = [i for i, x in enumerate(ex.labels) if x != IGNORE_INDEX]
        out.append([ex.input_ids[: scored[-1] + 1], scored[0]])
    return out


def _reference_nll(model_dir: Path, evals: list[list]) -> list[list[float]]:
    import torch

    from loraforge.models import load_model

    model = load_model(model_dir, dtype="float32").eval()
    out = []
    with torch.no_grad():
        for ids, first in evals:
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(logits[first - 1 : -1], dim=-1)
            target = torch.tensor(ids[first:])
            out.append([float(-logp.gather(1, target[:, None]).sum()), len(target)])
    return out


def _perplexity(nll: list[list[float]]) -> float:
    return math.exp(sum(n for n, _ in nll) / sum(c for _, c in nll))


def _match_share(reference: list[list[int]], got: list[list[int]]) -> float:
    matched = total = 0
    for ref, have in zip(reference, got, strict=True):
        total += max(len(ref), 1)
        n = 0
        while n < min(len(ref), len(have)) and ref[n] == have[n]:
            n += 1
        matched += n if ref else int(not have)
    return matched / total
