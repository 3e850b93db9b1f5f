"""Writes that a kill cannot leave half done: a temp dir (or file) beside the target, fsynced,
then renamed into place. Readers see the old version or the new one, never a mix.

Replacing an existing dir atomically needs ``renameat2(RENAME_EXCHANGE)`` (Linux >= 3.15): the
new and old dirs swap names in one step and the old one is deleted afterwards. Where that call
is missing (another OS, an old kernel, a filesystem without it) the old dir is renamed aside
first, which leaves a moment with no dir of that name; a reader that finds none (checkpoints:
``--resume``) falls back to the one before.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` and the dirs themselves to disk."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (the dir entry itself is flushed)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a dir; nothing more to do there
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names of ``a`` and ``b`` in one step; False where the OS cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def replace_dir(src: Path, dst: Path) -> None:
    """Move dir ``src`` to ``dst``, replacing ``dst`` if it exists (atomically where possible)."""
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        src.rename(dst)
    elif _exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)  # src now holds the old dst
    else:
        aside = dst.with_name(f".old-{dst.name}-{os.getpid()}")
        dst.rename(aside)
        src.rename(dst)
        shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(dst.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_as_umask(path: str | Path) -> None:
    """Give ``path`` (a file, or a dir and everything under it) the modes a plain write would:
    0o666 / 0o777 less the umask. Temp files and dirs are made owner-only (0o600 / 0o700) and
    safetensors (0.8) writes 0o600 whatever the umask; left so, an adapter or merged dir could
    not be read by a server running as another user (a vLLM container, a service account)."""
    mask, path = _umask(), Path(path)
    paths = [path] if path.is_file() else [path, *path.rglob("*")]
    for p in paths:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temp dir next to ``final``; when the block ends without an error, its
    contents are fsynced and it becomes ``final`` (replacing what was there). On an error the
    temp dir is removed and ``final`` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        share_as_umask(tmp)
        fsync_tree(tmp)
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write ``path`` through a fsynced temp file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding=encoding) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        share_as_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
