"""llama.cpp's own tools, as `loraforge export gguf` uses them: its converters and its runtime.

Nothing here re-implements llama.cpp. The converters (``convert_hf_to_gguf.py``,
``convert_lora_to_gguf.py`` and the ``gguf-py`` they import) come from the source distribution
of llama-cpp-python, which vendors llama.cpp at a known commit; the quantizer and the runtime
that checks the output are llama-cpp-python itself, built from that same sdist. One setup step
(``loraforge export gguf --setup``, or ``make setup-gguf``) fetches and builds both.

The build is portable on purpose. llama-cpp-python's default is ``GGML_NATIVE=ON``, and on an
Intel Xeon with AMX that build died with SIGILL (an AMX tile load) on the first batch of more
than one token of a quantized GGUF; an AVX-512 build would not run on an AVX2-only CPU. So it is
built for AVX2 + FMA + F16C with AMX and AVX-512 off: every x86-64 CPU of the last ten years
runs it, at some speed cost on the largest ones.

Everything that touches llama_cpp runs in a subprocess (export/llamacpp_probe.py), so a crash
in native code is reported as one line naming the signal, never takes loraforge down.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from loraforge.errors import UserError

LLAMA_CPP_PYTHON = "0.3.36"
SETUP_COMMAND = "loraforge export gguf --setup"
# Portable x86-64 build (see the module docstring); measured here: the build takes ~5 min on an
# idle 2-core machine. Other architectures (arm64) ignore the x86 flags.
CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
    "-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
)
# What the converters import besides torch/transformers/numpy (sentencepiece even for a BPE
# tokenizer), what llama_cpp imports at start-up and what its server imports (for `bench generate
# --against llama.cpp`): the `gguf` extra of pyproject.toml.
PYTHON_DEPS = [
    "sentencepiece>=0.2", "diskcache>=5.6",
    "pydantic-settings>=2.0.1", "sse-starlette>=1.6.1", "starlette-context>=0.3.6,<0.4",
]  # fmt: skip
_VENDORED = "vendor/llama.cpp/"
_WANTED = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")


class GGUFToolsMissing(UserError):
    """llama.cpp's converters or runtime are not set up."""


class LlamaCppError(UserError):
    """A llama.cpp tool failed (or died from a signal)."""


def tools_dir() -> Path:
    """Where the converters live: ``$LORAFORGE_HOME/llama.cpp/<llama-cpp-python version>``."""
    from loraforge.models import home

    return home() / "llama.cpp" / LLAMA_CPP_PYTHON


def converter(name: str) -> Path:
    """The path of one of llama.cpp's converter scripts; one line naming the setup if absent."""
    script = tools_dir() / name
    if not script.is_file() or importlib.util.find_spec("sentencepiece") is None:
        raise GGUFToolsMissing(
            f"llama.cpp's converters are not set up (no {script} or no sentencepiece): "
            f"run `{SETUP_COMMAND}` once"
        )
    return script


def runtime_installed() -> bool:
    """Whether llama-cpp-python (built by the setup) can be imported."""
    return importlib.util.find_spec("llama_cpp") is not None


def require_runtime() -> None:
    if not runtime_installed():
        raise GGUFToolsMissing(
            f"llama-cpp-python is not installed (it quantizes and checks the GGUF): run "
            f"`{SETUP_COMMAND}` once (a ~5 min build), or pass --no-check with --quant f16"
        )


def setup(echo: Callable[[str], object] = print, rebuild: bool = False) -> Path:
    """Fetch llama-cpp-python's sdist, unpack llama.cpp's converters into ``tools_dir()`` and
    build + install llama-cpp-python with the portable CMAKE_ARGS. Idempotent: parts already
    in place are kept (``rebuild``: build llama-cpp-python again)."""
    pip = [sys.executable, "-m", "pip"]
    _run(pip + ["install", "-q", *PYTHON_DEPS], "pip install " + " ".join(PYTHON_DEPS))
    have = _installed_version()
    need_build = rebuild or have != LLAMA_CPP_PYTHON
    if (tools_dir() / "convert_hf_to_gguf.py").is_file() and not need_build:
        echo(f"llama.cpp tools already set up in {tools_dir()} (llama-cpp-python {have})")
        return tools_dir()
    with tempfile.TemporaryDirectory(prefix="loraforge-llamacpp-") as tmp:
        echo(f"fetching the llama-cpp-python {LLAMA_CPP_PYTHON} source distribution ...")
        spec = f"llama-cpp-python=={LLAMA_CPP_PYTHON}"
        _run(
            pip + ["download", "-q", "--no-binary", ":all:", "--no-deps", spec, "-d", tmp],
            "pip download " + spec,
        )
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        _unpack_converters(sdist, tools_dir())
        echo(f"llama.cpp converters in {tools_dir()}")
        if need_build:
            echo(f"building llama-cpp-python (CMAKE_ARGS={CMAKE_ARGS}); takes minutes ...")
            env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS}
            env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
            _run(
                pip + ["install", "-q", "--no-deps", "--force-reinstall", str(sdist)],
                "building llama-cpp-python",
                env=env,
            )
    echo(f"llama-cpp-python {_installed_version()} installed")
    return tools_dir()


def _installed_version() -> str | None:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None


def _unpack_converters(sdist: Path, dest: Path) -> None:
    """The converter scripts and their Python packages only (2 MB of a 77 MB sdist)."""
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            _, _, rel = member.name.partition(_VENDORED)
            if rel and rel.startswith(_WANTED) and (member.isfile() or member.isdir()):
                member.name = rel
                tar.extract(member, staging, filter="data")
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)


def _run(cmd: list[str], what: str, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise LlamaCppError(f"{what} failed ({_status(proc.returncode)}): {_last_line(proc)}")
    return proc.stdout


def _status(returncode: int) -> str:
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit {returncode}"


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no output"])[-1].strip()[:300]


def convert(script: str, args: list[str], what: str) -> None:
    """Run one of llama.cpp's converters with this Python (it has torch and transformers)."""
    _run([sys.executable, str(converter(script)), *args], what)


def in_llama_cpp(task: dict, what: str) -> dict:
    """Run ``task`` (see llamacpp_probe.py) in a fresh process that loads llama_cpp; a signal
    is reported as such: "llama.cpp died with SIGILL while ..."."""
    require_runtime()
    with tempfile.TemporaryDirectory(prefix="loraforge-probe-") as tmp:
        task_file, out_file = Path(tmp) / "task.json", Path(tmp) / "out.json"
        task_file.write_text(json.dumps({**task, "out": str(out_file)}))
        cmd = [sys.executable, "-m", "loraforge.export.llamacpp_probe", str(task_file)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode < 0:
            raise LlamaCppError(
                f"llama.cpp died with {_status(proc.returncode)} while {what} "
                f"(a build for this CPU: `{SETUP_COMMAND}` rebuilds it portably)"
            )
        if proc.returncode != 0 or not out_file.is_file():
            raise LlamaCppError(f"llama.cpp failed while {what}: {_last_line(proc)}")
        return json.loads(out_file.read_text())
