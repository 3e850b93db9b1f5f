"""Runtime adapter management: which paths a client may load from, and the engine calls.

A client names an adapter dir; it must resolve inside ``--adapter-root``. ``..`` is refused
outright and the path is resolved (symlinks followed) before the check, so neither a relative
escape nor a symlink pointing out of the root gets through.
"""

from __future__ import annotations

import threading
from pathlib import Path

from loraforge.serve.schemas import APIError


def _require_root(root: Path | None, param: str) -> Path:
    """Runtime adapter changes, load and unload alike, are on only with ``--adapter-root``."""
    if root is None:
        raise APIError(
            400,
            "runtime adapter changes are off: start the server with --adapter-root DIR",
            param=param,
            code="adapter_changes_disabled",
        )
    return root


def resolve_in_root(root: Path | None, path: str) -> Path:
    """The real path of ``path`` (relative to ``root`` or to the working dir, or absolute), or a
    400 unless it lies inside ``root``."""
    root = _require_root(root, "lora_path")
    try:
        return _inside(root.resolve(), path)
    # a name over 255 bytes, a NUL byte, a loop of links. Bug fix: Python < 3.13 raises
    # RuntimeError("Symlink loop from ...") from Path.resolve(), which was a 500.
    except (OSError, ValueError, RuntimeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise APIError(
            400, f"lora_path: unusable path ({reason})", param="lora_path", code="invalid_path"
        ) from None


def _inside(real_root: Path, path: str) -> Path:
    p = Path(path).expanduser()
    if ".." in p.parts:
        raise APIError(
            400, f"lora_path '{path}' must not contain '..'", param="lora_path", code="invalid_path"
        )
    real = (p if p.is_absolute() else real_root / p).resolve()
    if not p.is_absolute() and not real.exists() and p.resolve().exists():
        real = p.resolve()  # "runs/shop", relative to the working dir, as vLLM users write it
    if not real.is_relative_to(real_root):
        raise APIError(
            400,
            f"lora_path '{path}' is outside the adapter root {real_root}",
            param="lora_path",
            code="outside_adapter_root",
        )
    if not real.is_dir():
        raise APIError(
            400, f"lora_path '{path}': no such adapter dir", param="lora_path", code="not_found"
        )
    # The dir is inside, but each file in it must be too: a weights file that is a symlink to
    # /etc/... would otherwise be read on the client's say-so.
    for f in real.iterdir():
        if not f.resolve().is_relative_to(real_root):
            raise APIError(
                400,
                f"lora_path '{path}': {f.name} links outside the adapter root",
                param="lora_path",
                code="outside_adapter_root",
            )
    return real


class AdapterRegistry:
    """Loads and unloads adapters on the engine, one change at a time."""

    def __init__(self, engine, root: str | Path | None, max_adapters: int = 64):
        self.engine = engine
        self.root = Path(root) if root is not None else None
        self.max_adapters = max_adapters  # each costs memory in every decode step's bank
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self.engine.adapter_names())

    def load(self, name: str, path: str) -> Path:
        from loraforge.errors import UserError

        real = resolve_in_root(self.root, path)
        with self._lock:
            if name == self.engine.base_name or name in self.names():
                raise APIError(
                    400,
                    f"The lora adapter '{name}' has already been loaded.",
                    param="lora_name",
                    code="adapter_already_loaded",
                )
            if len(self.names()) >= self.max_adapters:
                raise APIError(
                    400,
                    f"{self.max_adapters} adapters are loaded, this server's limit; "
                    "unload one first",
                    param="lora_name",
                    code="too_many_adapters",
                )
            try:
                self.engine.load_adapter(name, str(real))
            except UserError as e:  # not an adapter dir, or trained on another base model
                raise APIError(400, str(e), param="lora_path", code="invalid_adapter") from None
        return real

    def unload(self, name: str) -> None:
        _require_root(self.root, "lora_name")
        with self._lock:
            if name not in self.names():
                raise APIError(
                    404,
                    f"The lora adapter '{name}' cannot be found.",
                    param="lora_name",
                    code="model_not_found",
                    type="not_found_error",
                )
            self.engine.unload_adapter(name)
