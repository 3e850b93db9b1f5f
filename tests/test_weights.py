"""Reading safetensors without mmap: same tensors as safetensors' own loader, cast on the way."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraforge.weights import read_safetensors, safetensors_files


def test_read_matches_safetensors_and_casts(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "a": torch.randn(5, 7),
        "b": torch.randn(3, dtype=torch.float64),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    files = safetensors_files(tmp_path)
    same = read_safetensors(files)
    ref = load_file(tmp_path / "model.safetensors")
    assert same.keys() == ref.keys()
    for k in ref:
        assert torch.equal(same[k], ref[k]) and same[k].dtype == ref[k].dtype
    cast = read_safetensors(files, torch.bfloat16)
    for k in ("a", "b", "empty"):  # cast through one scratch buffer, each keeps its own values
        assert cast[k].dtype == torch.bfloat16 and torch.equal(cast[k], ref[k].bfloat16()), k
    assert cast["ids"].dtype == torch.int64  # integers keep their dtype


def test_sharded_index_and_truncated_file(tmp_path):
    save_file({"x": torch.ones(4)}, tmp_path / "m-1.safetensors")
    save_file({"y": torch.zeros(2, 2)}, tmp_path / "m-2.safetensors")
    index = {"weight_map": {"x": "m-1.safetensors", "y": "m-2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    got = read_safetensors(safetensors_files(tmp_path))
    assert set(got) == {"x", "y"}
    data = (tmp_path / "m-2.safetensors").read_bytes()
    (tmp_path / "m-2.safetensors").write_bytes(data[:-4])
    with pytest.raises(OSError, match="truncated"):
        read_safetensors(safetensors_files(tmp_path))
    assert safetensors_files(tmp_path / "nothing") is None


def test_load_model_reads_the_same_weights(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from loraforge.models import load_model

    ours = load_model(tiny_model_dir, dtype="bfloat16")
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    ref_state = ref.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    assert ours.name_or_path == str(tiny_model_dir)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)
