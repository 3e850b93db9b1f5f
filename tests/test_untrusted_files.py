"""Files loraforge reads on someone else's say-so: checkpoints, adapter dirs, question and data
files. Each test is a fault found by reading the code as an attacker or an unlucky user would."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from loraforge.adapters import AdapterError, read_meta
from loraforge.data.doctor import doctor
from loraforge.data.formats import RecordProblem, content_text
from loraforge.data.inputs import read_inputs
from loraforge.data.sources import DataError, read_records
from loraforge.data.tokenize import TemplateError, template_text
from loraforge.fsutil import atomic_dir
from loraforge.train import checkpoint as ckpt


class _Pwn:
    def __reduce__(self):
        return (os.system, (f"touch {_Pwn.marker}",))


def test_resume_never_unpickles_code(tmp_path):
    """A shared checkpoint whose optimizer.pt pickles a call must not run it."""
    _Pwn.marker = tmp_path / "pwned"
    d = tmp_path / "step-000001"
    d.mkdir()
    torch.save({"state": _Pwn()}, d / "optimizer.pt")
    with pytest.raises(ckpt.CheckpointError, match="cannot be loaded safely"):
        ckpt._load(d / "optimizer.pt")
    assert not _Pwn.marker.exists()


def test_rng_state_round_trips_without_pickle(tmp_path):
    import random

    import numpy as np

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(ckpt._rng_state(), tmp_path / "rng.pt")
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt._set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


def test_atomic_dir_replaces_or_keeps(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as t:
        (t / "a").write_text("1")
    with atomic_dir(final) as t:  # a replace: the old contents go, no leftovers beside it
        (t / "b").write_text("2")
    assert [p.name for p in final.iterdir()] == ["b"]
    with pytest.raises(KeyError), atomic_dir(final) as t:
        (t / "c").write_text("3")
        raise KeyError("killed mid-save")
    assert [p.name for p in final.iterdir()] == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_files_take_the_umask_not_owner_only(tmp_path, mask):
    """Temp files and dirs are 0o600 / 0o700 and safetensors writes 0o600: an adapter or merged
    dir written so could not be read by a vLLM container or service running as another user."""
    import torch
    from safetensors.torch import save_file

    from loraforge.fsutil import atomic_write_text

    old = os.umask(mask)
    try:
        with atomic_dir(tmp_path / "merged") as t:
            save_file({"w": torch.zeros(2)}, t / "model.safetensors")
            (t / "sub").mkdir()
        atomic_write_text(tmp_path / "Modelfile", "FROM x.gguf\n")
    finally:
        os.umask(old)
    merged = tmp_path / "merged"
    assert merged.stat().st_mode & 0o777 == 0o777 & ~mask
    assert (merged / "sub").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (merged / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "Modelfile").stat().st_mode & 0o777 == 0o666 & ~mask


def _adapter_dir(path: Path, **meta) -> Path:
    path.mkdir()
    (path / "adapter_config.json").write_text("{}")
    base = {"base_model": "smollm2-135m", "chat_template": "{{ messages }}", "system": None}
    (path / "loraforge.json").write_text(json.dumps({**base, **meta}))
    return path


def test_adapter_template_is_never_a_path(tmp_path, tokenizer):
    bad = _adapter_dir(tmp_path / "a", chat_template="/proc/self/environ")
    with pytest.raises(AdapterError, match="chat_template must be the Jinja text"):
        read_meta(bad)
    with pytest.raises(TemplateError):
        template_text(tokenizer, "/proc/self/environ")
    assert template_text(tokenizer, "chatml").startswith("{% for")


def test_adapter_base_gguf_is_not_converted_on_load(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFORGE_HOME", str(tmp_path / "home"))
    gguf = tmp_path / "smollm2-135m.gguf"  # named like the bundled model, to take its cache
    gguf.write_bytes(b"GGUF")
    bad = _adapter_dir(tmp_path / "a", base_model=str(gguf))
    with pytest.raises(AdapterError, match="not converted yet"):
        read_meta(bad)
    assert not (tmp_path / "home").exists()  # nothing converted, nothing cached


def test_adapter_meta_of_wrong_types(tmp_path):
    bad = _adapter_dir(tmp_path / "a", system=["x"])
    with pytest.raises(AdapterError, match="system must be text"):
        read_meta(bad)
    (tmp_path / "a" / "loraforge.json").write_text("[" * 100_000)
    with pytest.raises(AdapterError, match="unreadable"):
        read_meta(bad)


@pytest.fixture
def nasty(tmp_path) -> dict[str, Path]:
    files = {}
    files["nested.jsonl"] = "[" * 100_000 + "\n" + json.dumps({"query": "q", "response": "r"})
    files["nested.json"] = "[" * 100_000
    long = "x" * 200_000
    files["long.csv"] = f"query,response\nq,{long}\n"
    files["parts.jsonl"] = json.dumps(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}
    )
    out = {}
    for name, text in files.items():
        out[name] = tmp_path / name
        out[name].write_text(text)
    return out


def test_data_doctor_survives_what_it_diagnoses(nasty):
    lines = []
    code = doctor([str(p) for p in nasty.values()], echo=lines.append)
    text = "\n".join(lines)
    assert code == 1
    assert "nested.jsonl:1: JSON nested too deeply" in text
    assert "nested.json: JSON nested too deeply" in text
    assert "long.csv: 1 records (query_response 1)" in text
    assert "parts.jsonl:1: messages[0]: content part 0 (text) is not text" in text


def test_long_csv_cell_is_read_whole(nasty):
    (rec,) = list(read_records(nasty["long.csv"], "long.csv"))
    assert len(rec.value["response"]) == 200_000


def test_content_text():
    assert content_text([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == "ab"
    assert content_text({"type": "text", "text": "a"}) == "a"
    with pytest.raises(RecordProblem, match="content part 0 .image_url. is not text"):
        content_text([{"type": "image_url"}])


def test_non_utf8_questions_are_one_line(tmp_path):
    txt = tmp_path / "q.txt"
    txt.write_bytes("你好\n".encode("gbk"))
    with pytest.raises(DataError, match=r"q.txt: not UTF-8 text \(byte 0"):
        read_inputs(txt)


def test_infer_resume_drops_a_line_cut_mid_character(tmp_path):
    from loraforge.infer.batch import _answered

    out = tmp_path / "answers.jsonl"
    good = json.dumps({"query": "q1", "response": "好"}, ensure_ascii=False) + "\n"
    cut = json.dumps({"query": "q2", "response": "好好"}, ensure_ascii=False).encode()[:-5]
    out.write_bytes(good.encode() + cut)
    done = _answered(out)
    assert sum(done.values()) == 1
    assert out.read_text(encoding="utf-8") == good  # rewritten whole, without the cut line


def test_adapter_files_must_stay_inside_the_root(tmp_path):
    from loraforge.serve.registry import resolve_in_root
    from loraforge.serve.schemas import APIError

    root = tmp_path / "root"
    d = _adapter_dir(root.mkdir() or root / "a")
    secret = tmp_path / "secret.safetensors"
    secret.write_text("x")
    assert resolve_in_root(root, "a") == d.resolve()
    (d / "adapter_model.safetensors").symlink_to(secret)
    with pytest.raises(APIError, match="adapter_model.safetensors links outside"):
        resolve_in_root(root, "a")
    with pytest.raises(APIError, match="unusable path") as e:
        resolve_in_root(root, "x" * 300)
    assert e.value.status == 400
