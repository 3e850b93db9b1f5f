"""What both benches share: the machine's description and the Markdown log in docs/."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path


def machine_info() -> dict:
    """CPU model, cores, torch threads and version, and the GPU when there is one."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads()}
    info["torch"] = torch.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_description(info: dict | None = None) -> str:
    info = info or machine_info()
    where = info.get("gpu") or f"{info['cpu']}, {info['cores']} cores"
    return f"{where}, torch {info['torch']}"


def append_row(path: Path, section: str, header: list[str], row: str) -> None:
    """Add ``row`` to the table under ``## section`` in ``path``, creating either if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    row = f"| {date} {row.lstrip()}"
    text = (
        path.read_text() if path.is_file() else "# Benchmarks\n\nAppended by `loraforge bench`.\n"
    )
    lines = text.rstrip("\n").split("\n")
    heading = f"## {section}"
    if heading not in lines:
        lines += ["", heading, "", *header, row]
    else:
        i = lines.index(heading) + 1
        while i < len(lines) and not lines[i].startswith("|"):
            i += 1
        while i < len(lines) and lines[i].startswith("|"):
            i += 1
        lines.insert(i, row)
    path.write_text("\n".join(lines) + "\n")
