"""The Studio page's event handlers (webui/app.py wires them): each returns at once; the work is
in the job store (jobs.py), the data checks (dataview.py) and the settings (settings.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gradio as gr

from loraforge.errors import UserError
from loraforge.webui.chat import model_names
from loraforge.webui.dataview import data_files, diagnose, lengths_and_preview, save_upload
from loraforge.webui.jobs import Job, JobStore
from loraforge.webui.progress import job_progress, log_tail, loss_svg, status_line
from loraforge.webui.settings import MAIN_FIELDS, PRESETS, build_config, sft_command


class Handlers:
    def __init__(self, engine, store: JobStore, data_dir: Path):
        self.engine, self.store, self.data_dir = engine, store, data_dir
        self.field_names: list[str] = []  # the order of the form's inputs (app.py sets it)
        self._refused: dict[str, str] = {}  # adapters the engine cannot load (another base)

    def _form(self, values: tuple) -> dict[str, Any]:
        form = dict(zip(self.field_names, values, strict=True))
        if not form.get("dataset"):
            form.pop("dataset", None)
        return form

    # ---- Data ---------------------------------------------------------------------------------
    def _check(self, datasets: list[str], form: dict) -> list:
        name, author = form.get("model_name") or "", form.get("model_author") or ""
        verdict = diagnose(datasets, name, author)
        lengths, preview = "", ""
        if not any(line.startswith("0 usable") for line in verdict.lines):
            try:
                lengths, preview = lengths_and_preview(
                    datasets,
                    form.get("model") or self.engine.model_spec,
                    name=name,
                    author=author,
                    max_length=int(form.get("max_length") or 1024),
                    system=form.get("system") or None,
                )
            except UserError as e:  # no model, a template that refuses the data, ...
                lengths = f"no preview: {e}"
        return [
            datasets,
            ", ".join(datasets),
            verdict.text,
            lengths,
            preview,
            gr.Button(interactive=verdict.ok),
        ]

    def on_upload(self, file, *values) -> list:
        if not file:
            return [gr.skip()] * 8
        path = save_upload(file, self.data_dir)
        return [
            *self._check([str(path)], self._form(values)),
            gr.Dropdown(choices=data_files(self.data_dir), value=str(path)),
            None,  # the drop zone empties again, ready for the next file
        ]

    def on_pick(self, path: str, *values) -> list:
        return self._check([path] if path else [], self._form(values))

    def on_selfcog(self, *values) -> list:
        return self._check(["selfcog"], self._form(values))

    # ---- Train --------------------------------------------------------------------------------
    def on_preset(self, preset: str) -> list:
        chosen = PRESETS.get(preset, {})
        return [chosen[n] if n in chosen else gr.skip() for n in MAIN_FIELDS]

    def on_settings(self, *values) -> str:
        try:
            return sft_command(build_config(self._form(values)), with_output=False)
        except UserError as e:
            return f"# {e}"

    def on_start(self, job_name: str, *values) -> list:
        form = self._form(values)
        verdict = diagnose(
            form.get("dataset", []), form.get("model_name") or "", form.get("model_author") or ""
        )
        if not verdict.ok:
            raise gr.Error("the data has problems: the Data tab lists them")
        try:
            job = self.store.submit(build_config(form), job_name or "")
        except UserError as e:
            raise gr.Error(str(e)) from None
        return [
            f"job #{job.id} is {job.state}",
            gr.Dropdown(choices=self.job_choices(), value=job.id),
            gr.Tabs(selected="jobs"),
        ]

    # ---- Jobs ---------------------------------------------------------------------------------
    def table(self) -> list[list]:
        rows = []
        for job in self.store.list():
            rows.append([job.id, job.name, job.state, status_line(job, job_progress(job))])
        return rows

    def job_choices(self) -> list[tuple[str, int]]:
        return [(f"#{j.id} {j.name} ({j.state})", j.id) for j in self.store.list()]

    def _job(self, job_id) -> Job | None:
        if job_id in (None, ""):
            return None
        try:
            return self.store.get(int(job_id))
        except UserError:
            return None

    def on_job(self, job_id) -> list:
        job = self._job(job_id)
        if job is None:
            return ["", "", ""]
        p = job_progress(job)
        lines = [f"**#{job.id} {job.name}**: {status_line(job, p)}"]
        if job.error:
            lines.append(f"**error:** {job.error}")
        if job.has_adapter:
            lines.append(
                f"adapter: `{job.output}` (in Chat and Compare as `{job.output.name}`"
                + (
                    f"; not loaded: {self._refused[job.output.name]}"
                    if job.output.name in self._refused
                    else ""
                )
                + ")"
            )
        lines.append(f"`{sft_command(self.store.config_of(job))}`")
        return ["\n\n".join(lines), loss_svg(p), log_tail(job)]

    def _act(self, fn, job_id, done: str) -> str:
        job = self._job(job_id)
        if job is None:
            return "pick a job first"
        try:
            fn(job.id)
        except UserError as e:
            return f"**error:** {e}"
        return done.format(id=job.id)

    def on_stop(self, job_id) -> str:
        return self._act(self.store.stop, job_id, "job #{id} stopped")

    def on_resume(self, job_id) -> str:
        return self._act(self.store.resume, job_id, "job #{id} resumes from its last checkpoint")

    def on_delete(self, job_id) -> list:
        msg = self._act(self.store.delete, job_id, "job #{id} deleted")
        return [msg, gr.Dropdown(choices=self.job_choices(), value=None)]

    def on_merge(self, job_id):
        """`loraforge merge` into ``<adapter>-merged`` beside the adapter dir."""
        yield from self._export(job_id, "merge", ["merge"], "-merged")

    def on_gguf(self, job_id):
        """`loraforge export gguf` (f16, checked through llama.cpp) into ``<adapter>.gguf``."""
        yield from self._export(job_id, "GGUF export", ["export", "gguf"], ".gguf")

    def _export(self, job_id, what: str, verb: list[str], suffix: str):
        """Run an export verb on a finished job's adapter in its own process (it loads the model:
        seconds to minutes), streaming where it stands into the page."""
        job = self._job(job_id)
        if job is None or not job.has_adapter:
            yield f"only a finished job's adapter can be used for {what}"
            return
        out = job.output.with_name(job.output.name + suffix)
        cmd = [sys.executable, "-m", "loraforge.cli", *verb, "--adapter", str(job.output)]
        cmd += ["--output", str(out), "--force"]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        yield f"{what} of #{job.id} into `{out}` …"
        lines = []
        for line in proc.stdout:
            if line.strip():
                lines.append(line.strip())
                yield f"{what} of #{job.id} ({time.monotonic() - t0:.0f} s): {lines[-1]}"
        last = lines[-1] if lines else "no output"
        if proc.wait() == 0:
            yield f"{what} done in {time.monotonic() - t0:.0f} s: `{out}`\n\n{last}"
        else:
            yield f"**{what} failed:** {last}"

    def _sync_adapters(self) -> list[str]:
        """Load every finished job's adapter into the chat engine (once); unload deleted ones."""
        jobs = {j.output.name: j for j in self.store.list() if j.has_adapter}
        loaded = set(self.engine.adapter_names())
        for name, job in jobs.items():
            if name not in loaded and name not in self._refused:
                try:
                    self.engine.load_adapter(name, str(job.output))
                except UserError as e:  # trained on another base than the chat engine's
                    self._refused[name] = str(e)
        return model_names(self.engine)

    def on_tick(self, job_id, seen: dict) -> list:
        """Once a second: the job table, the job list, the chosen job and the chat models; a
        part that did not change is skipped (a dropdown being used stays open)."""
        seen = dict(seen or {})
        out: list = []
        for key, value, make in (
            ("table", self.table(), lambda v: v),
            ("jobs", self.job_choices(), lambda v: gr.Dropdown(choices=v)),
        ):
            out.append(gr.skip() if seen.get(key) == value else make(value))
            seen[key] = value
        out += self.on_job(job_id)
        models = self._sync_adapters()
        if seen.get("models") == models:
            out += [gr.skip(), gr.skip()]
        else:
            out += [gr.Dropdown(choices=models), gr.CheckboxGroup(choices=models, value=models)]
        seen["models"] = models
        return [*out, seen]
