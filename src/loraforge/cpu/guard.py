"""Version guards for the fast paths that reach into library internals.

Each fast path in this package leans on something torch, transformers or PEFT do not promise to
keep: a private op, a module's forward, an attribute PEFT happens to read. Each declares the
releases it was measured on (a ``Patch``) and a probe: the private call on tiny tensors, checked
against the plain computation. Outside those releases, or when the probe raises, the plain path
is used and one warning line says so: after an upgrade a slower step beats a crash or a quietly
different answer. The ranges start at the releases all this was measured on (torch 2.13,
transformers 5.24, peft 0.21) and stop at the next minor release, which may change any of these
internals: widen one only after measuring again (the speed figures and the parity tests).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass

import torch
from packaging.version import InvalidVersion, Version
from rich.markup import escape

from loraforge.console import err_console


@dataclass(frozen=True)
class Patch:
    """A fast path over library internals. ``versions``: package -> (first, stop), the releases
    it was measured on, ``first <= version < stop`` by release number (so 2.14.0rc1 is not below
    2.14); ``plain``: what runs instead, for the warning."""

    name: str
    plain: str
    versions: dict[str, tuple[str, str]]


_warned: set[str] = set()


def installed(package: str) -> str | None:
    """The installed version of ``package`` (a distribution name), or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _in_range(version: str | None, first: str, stop: str) -> bool:
    if version is None:
        return False
    try:
        release = Version(version).release
    except InvalidVersion:
        return False
    return Version(first).release <= release < Version(stop).release


def check(patch: Patch, probe: Callable[[], object] | None = None) -> bool:
    """Whether ``patch`` may be used here: every version in its range and ``probe()`` returns.

    Otherwise the caller takes the plain path, and the first refusal of each patch in a process
    prints one warning line. The probe runs with the global RNG saved and restored: a seeded run
    gets the same LoRA init and dropout masks whether or not a guard probed first."""
    for package, (first, stop) in patch.versions.items():
        found = installed(package)
        if not _in_range(found, first, stop):
            return _refuse(patch, f"measured on {package} >={first},<{stop}, found {found}")
    if probe is not None:
        try:
            with torch.random.fork_rng(devices=[]):
                probe()
        except Exception as e:  # noqa: BLE001 - whatever breaks, the plain path still works
            detail = (str(e).strip().splitlines() or [""])[0][:160]
            return _refuse(patch, f"its check failed: {type(e).__name__}: {detail}")
    return True


def _refuse(patch: Patch, why: str) -> bool:
    if patch.name not in _warned:
        _warned.add(patch.name)
        err_console.print(
            f"[yellow]warning:[/yellow] fast path '{escape(patch.name)}' not used ({escape(why)}); "
            f"{escape(patch.plain)} instead"
        )
    return False
