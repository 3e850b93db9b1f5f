"""The process that loads llama_cpp for `export gguf` (run by llamacpp.in_llama_cpp).

``python -m loraforge.export.llamacpp_probe TASK.json`` with TASK one of:
- ``{"op": "quantize", "src", "dst", "quant"}``: llama.cpp's own quantizer
  (``llama_model_quantize``, what the ``llama-quantize`` binary calls).
- ``{"op": "check", "gguf", "prompts": [[ids]], "max_new_tokens", "texts": [str],
  "nll": [[ids, first_scored]]}``: greedy answers to ``prompts`` (argmax, stopping at the GGUF's
  end-of-generation tokens), llama.cpp's tokenization of ``texts`` (with the BOS handling the
  GGUF declares, as llama.cpp apps tokenize), and the summed negative log-likelihood of each
  ``nll`` sequence from position ``first_scored`` on.
Writes the result as JSON to ``task["out"]``. Kept apart from loraforge's process so a native
crash (SIGILL on some CPU builds) is a reported signal, not a dead CLI.
"""

from __future__ import annotations

import json
import sys

QUANT_TYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def quantize(task: dict) -> dict:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[task["quant"]])
    params.nthread = 0  # llama.cpp's default: all cores
    rc = llama_cpp.llama_model_quantize(
        task["src"].encode(), task["dst"].encode(), ctypes.byref(params)
    )
    if rc != 0:
        raise SystemExit(f"error: llama_model_quantize returned {rc}")
    return {"ok": True}


def _log_softmax_at(row, target: int) -> float:
    import numpy as np

    row = row.astype(np.float64)
    m = row.max()
    return float(row[target] - m - np.log(np.exp(row - m).sum()))


def check(task: dict) -> dict:
    import llama_cpp
    import numpy as np

    longest = max([len(p) for p in task["prompts"]] + [len(s) for s, _ in task["nll"]] + [1])
    llm = llama_cpp.Llama(
        model_path=task["gguf"],
        n_ctx=longest + task["max_new_tokens"] + 8,
        n_batch=512,
        n_threads=task.get("threads"),
        logits_all=True,
        verbose=False,
    )
    vocab = llm._model.vocab
    out: dict = {"eos": llm.token_eos(), "answers": [], "finished": [], "tokens": [], "nll": []}
    for prompt in task["prompts"]:
        llm.reset()
        llm.eval(prompt)
        answer, finished = [], False
        for _ in range(task["max_new_tokens"]):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                finished = True
                break
            answer.append(tok)
            llm.eval([tok])
        out["answers"].append(answer)
        out["finished"].append(finished)
    for text in task["texts"]:
        out["tokens"].append(llm.tokenize(text.encode(), add_bos=True, special=True))
    for ids, first in task["nll"]:
        llm.reset()
        llm.eval(ids)
        total = -sum(_log_softmax_at(llm.scores[i - 1], ids[i]) for i in range(first, len(ids)))
        out["nll"].append([total, len(ids) - first])
    return out


def main() -> None:
    task = json.loads(open(sys.argv[1], encoding="utf-8").read())
    result = {"quantize": quantize, "check": check}[task["op"]](task)
    with open(task["out"], "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
