"""`loraforge merge`: merged weights equal base + adapter, and load with transformers alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_adapter

from loraforge.adapters import AdapterError
from loraforge.data.tokenize import prompt_ids, resolve_template
from loraforge.export.merge import MergeError, bake_system, merge_adapter

SYSTEM = 'You are Grace, made by "Ada" 实验室.\nAnswer briefly {{ not jinja }}.'


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir, tokenizer) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"), 1, SYSTEM)


@pytest.fixture(scope="module")
def merged(tmp_path_factory, adapter) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("merged") / "model"
    return out, merge_adapter(adapter, out)


def reference_model(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()


def test_bake_system_renders_like_training(tokenizer):
    template = resolve_template(tokenizer)
    baked = bake_system(template, SYSTEM)
    convs = [
        [{"role": "user", "content": "你是谁？"}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}],
    ]
    for conv in convs:
        text = tokenizer.apply_chat_template(
            conv, chat_template=baked, tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == prompt_ids(tokenizer, conv, template=template, system=SYSTEM)
    assert "SmolLM" not in tokenizer.apply_chat_template(
        convs[0], chat_template=baked, tokenize=False
    )
    assert bake_system(template, None) == template


def test_merged_dir_contents(merged, tokenizer):
    out, result = merged
    assert result.max_abs_diff <= 1e-3 and result.dtype == "float32"
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("adapter_*")) and not (out.parent / f".{out.name}").exists()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    gen = json.loads((out / "generation_config.json").read_text())
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert gen["eos_token_id"] in (im_end, [im_end])


def test_merged_logits_and_greedy_equal_adapter(merged, adapter, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    out, _ = merged
    ref = reference_model(tiny_model_dir, adapter)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": "Who are you?"}])])
    with torch.no_grad():
        diff = (ref(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max()
        assert float(diff) < 1e-4
        kw = {"max_new_tokens": 12, "do_sample": False}
        assert (
            ref.generate(input_ids=ids, **kw).tolist()
            == plain.generate(input_ids=ids, **kw).tolist()
        )


LOAD_WITHOUT_PEFT = r"""
import json, sys
BLOCKED = ("peft", "loraforge")
class Hide:  # wraps every finder so peft and loraforge look not installed
    def __init__(self, f): self.f = f
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED: return None
        return self.f.find_spec(name, path, target) if hasattr(self.f, "find_spec") else None
    def __getattr__(self, a): return getattr(self.f, a)
sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
try:
    import peft
    peft_importable = True
except ImportError:
    peft_importable = False
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d)
ids = tok.apply_chat_template([{"role": "user", "content": "Who are you?"}],
                              add_generation_prompt=True, return_dict=True)["input_ids"]
out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
print(json.dumps({"prompt": list(ids), "out": out[0].tolist(), "peft_importable": peft_importable,
                  "imported": [m for m in sys.modules if m.split(".")[0] in BLOCKED]}))
"""


def test_merged_dir_loads_with_transformers_only(merged, adapter, tiny_model_dir, tokenizer):
    out, _ = merged
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PEFT, str(out)],
        capture_output=True,
        text=True,
        cwd=out.parent,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not got["peft_importable"] and got["imported"] == []
    # The merged template carries the training-time system prompt: same prompt as training.
    conv = [{"role": "user", "content": "Who are you?"}]
    assert got["prompt"] == prompt_ids(tokenizer, conv, system=SYSTEM)
    ref = reference_model(tiny_model_dir, adapter)
    with torch.no_grad():
        want = ref.generate(
            input_ids=torch.tensor([got["prompt"]]), max_new_tokens=12, do_sample=False
        )
    assert got["out"] == want[0].tolist()


def test_bfloat16_merge_within_measured_tolerance(tmp_path, adapter):
    result = merge_adapter(adapter, tmp_path / "bf16", dtype="bfloat16")
    assert 0 < result.max_abs_diff <= result.tolerance
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


def test_broken_merge_is_caught(tmp_path, adapter, monkeypatch):
    from peft.tuners.tuners_utils import BaseTuner

    # A merge that silently drops the adapter must fail the self-check and write nothing.
    monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, **kw: self.unload())
    with pytest.raises(MergeError, match="differs from base \\+ adapter"):
        merge_adapter(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_bfloat16_save_bug_is_caught(tmp_path, adapter, monkeypatch):
    from safetensors.torch import load_file, save_file
    from transformers import PreTrainedModel

    save = PreTrainedModel.save_pretrained

    def corrupting_save(self, out, **kw):  # a save that garbles one projection
        save(self, out, **kw)
        f = Path(out) / "model.safetensors"
        tensors = load_file(f)
        key = next(k for k in tensors if "layers.1.mlp.down_proj" in k)
        tensors[key] = tensors[key] * 1.5
        save_file(tensors, f, metadata={"format": "pt"})

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", corrupting_save)
    with pytest.raises(MergeError, match="bfloat16.*save/reload changed logits"):
        merge_adapter(adapter, tmp_path / "bf16", dtype="bfloat16")


def test_user_errors(tmp_path, adapter, tokenizer):
    from helpers import make_tiny_model

    other = make_tiny_model(tmp_path / "other", tokenizer, seed=3)
    with pytest.raises(AdapterError, match="other"):
        merge_adapter(adapter, tmp_path / "x", model=str(other))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(MergeError, match="not empty"):
        merge_adapter(adapter, tmp_path / "full")
    with pytest.raises(MergeError, match="--dtype"):
        merge_adapter(adapter, tmp_path / "y", dtype="int8")


def test_cli_merge(tmp_path, adapter):
    from typer.testing import CliRunner

    from loraforge.cli import app

    res = CliRunner().invoke(app, ["merge", "--adapter", str(adapter), "--output", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "max |logit diff|" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["merge", "--adapter", str(tmp_path), "--output", "z"])
    assert res.exit_code == 1 and "not an adapter dir" in res.output
