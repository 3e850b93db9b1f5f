"""`loraforge studio`: the no-code path in a Gradio page. Data (upload, the doctor's verdict, a
preview of the trained spans), Train (model, preset, every SFTConfig field, the equivalent
command), Jobs (jobs.py: each a `loraforge sft` process; live loss chart, Stop/Resume/Delete,
Merge) and Chat/Compare (chat.py), where a finished job's adapter appears by itself.

Gradio takes seconds to import, so only this package imports it, and only when called. Every
handler returns at once: training runs in its own process, the page polls files once a second.
"""

from __future__ import annotations

import os
from pathlib import Path

from loraforge.webui.jobs import JobStore

CSS = """
footer {display: none !important}
mark.trained {background: #bbf7d0; color: #14532d}
span.prompt {color: #6b7280}
.example .source {font-size: 12px; color: #6b7280}
"""


def studio_home() -> Path:
    """The Studio's DB and job dirs: ``$LORAFORGE_HOME/studio`` (models.py's home)."""
    from loraforge.models import home

    return home() / "studio"


def _password_check(key: str):
    """Gradio's login: any user name, the key as password (compared in constant time)."""
    import secrets

    def check(_user: str, password: str) -> bool:
        return secrets.compare_digest(password.encode(), key.encode())

    return check


def _control(gr, name: str):
    """The form control of one SFTConfig field: labelled with its flag, its help as info."""
    from loraforge.cli.options import flag
    from loraforge.config import SFTConfig
    from loraforge.webui.settings import field_kind, form_value

    kind, choices = field_kind(name)
    kw = {
        "label": flag(name),
        "info": SFTConfig.model_fields[name].description,
        "value": form_value(name),
        "elem_id": f"cfg-{name}",
    }
    if kind == "bool":
        return gr.Checkbox(**kw)
    if kind == "choice":
        return gr.Dropdown(choices, **kw)
    if kind in ("int", "float"):
        return gr.Number(precision=0 if kind == "int" else None, **kw)
    return gr.Textbox(**kw)


def build_studio(engine, store: JobStore, data_dir: Path, *, default_chat: str | None = None):
    """The Gradio Blocks app (not launched). ``engine`` follows loraforge.infer.engine.Engine."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from loraforge.models import list_models
    from loraforge.webui import handlers
    from loraforge.webui.chat import chat_tabs
    from loraforge.webui.dataview import data_files
    from loraforge.webui.settings import ADVANCED_FIELDS, MAIN_FIELDS, PRESETS

    data_dir = Path(data_dir)
    h = handlers.Handlers(engine, store, data_dir)
    models = [m.name for m in list_models() if "missing" not in m.kind]
    train_model = engine.model_spec
    models = models if train_model in models else [train_model, *models]

    with gr.Blocks(title="loraforge studio", analytics_enabled=False) as demo:
        gr.Markdown(f"## loraforge studio · chat base model `{engine.base_name}`")
        datasets = gr.State([])
        with gr.Tabs() as tabs:
            with gr.Tab("Data", id="data"):
                with gr.Row():
                    upload = gr.File(
                        label="Drop a dataset here (.jsonl .json .csv .parquet)",
                        file_types=[".jsonl", ".json", ".csv", ".parquet"],
                        elem_id="data-upload",
                    )
                    with gr.Column():
                        pick = gr.Dropdown(
                            data_files(data_dir),
                            value=None,
                            label=f"or pick a file under {data_dir}",
                            elem_id="data-pick",
                        )
                        with gr.Row():
                            name = gr.Textbox(label="--model-name", elem_id="selfcog-name")
                            author = gr.Textbox(label="--model-author", elem_id="selfcog-author")
                        selfcog = gr.Button("Use the self-cognition set", elem_id="use-selfcog")
                verdict = gr.Textbox(
                    label="Data doctor", lines=8, interactive=False, elem_id="doctor"
                )
                lengths = gr.Markdown(elem_id="lengths")
                preview = gr.HTML(elem_id="preview")
            with gr.Tab("Train", id="train"):
                with gr.Row():
                    model = gr.Dropdown(
                        models,
                        value=train_model,
                        allow_custom_value=True,
                        label="--model (bundled, cached, or a local path)",
                        elem_id="cfg-model",
                    )
                    shown_data = gr.Textbox(
                        label="--dataset (from the Data tab)", interactive=False, elem_id="dataset"
                    )
                    job_name = gr.Textbox(label="Job name", elem_id="job-name")
                preset = gr.Radio(list(PRESETS), value="new identity", label="Preset")
                with gr.Row():
                    main = [_control(gr, n) for n in MAIN_FIELDS]
                with gr.Accordion("Advanced: the same names as the CLI flags", open=False):
                    advanced = []
                    for i in range(0, len(ADVANCED_FIELDS), 4):
                        with gr.Row():
                            advanced += [_control(gr, n) for n in ADVANCED_FIELDS[i : i + 4]]
                command = gr.Textbox(
                    label="The same run from a terminal",
                    interactive=False,
                    buttons=["copy"],
                    elem_id="sft-command",
                )
                start = gr.Button(
                    "Start training", variant="primary", interactive=False, elem_id="start"
                )
                start_msg = gr.Markdown(elem_id="start-msg")
            with gr.Tab("Jobs", id="jobs"):
                table = gr.Dataframe(
                    headers=["id", "name", "state", "progress"],
                    value=h.table(),
                    interactive=False,
                    elem_id="jobs",
                )
                job = gr.Dropdown(h.job_choices(), label="Job", elem_id="job-pick")
                status = gr.Markdown(elem_id="job-status")
                chart = gr.HTML(elem_id="loss-chart")
                with gr.Row():
                    stop = gr.Button("Stop", elem_id="job-stop")
                    resume = gr.Button("Resume", elem_id="job-resume")
                    delete = gr.Button("Delete (job and adapter dir)", elem_id="job-delete")
                    merge = gr.Button("Merge into a full model", elem_id="job-merge")
                    gguf = gr.Button("Export GGUF (llama.cpp)", elem_id="job-gguf")
                action = gr.Markdown(elem_id="job-msg")
                log = gr.Textbox(label="Log (tail)", lines=12, interactive=False, elem_id="job-log")
            controls = chat_tabs(engine, default_chat)
        timer = gr.Timer(1.0)

        fields = [model, name, author, datasets, *main, *advanced]
        h.field_names = ["model", "model_name", "model_author", "dataset"]
        h.field_names += [*MAIN_FIELDS, *ADVANCED_FIELDS]
        checked = [datasets, shown_data, verdict, lengths, preview, start]
        upload.upload(h.on_upload, [upload, *fields], [*checked, pick, upload])
        pick.input(h.on_pick, [pick, *fields], checked)
        selfcog.click(h.on_selfcog, fields, checked)
        preset.input(h.on_preset, [preset], main)
        gr.on([c.change for c in fields], h.on_settings, fields, command)
        start.click(h.on_start, [job_name, *fields], [start_msg, job, tabs])
        job_view = [status, chart, log]
        job.change(h.on_job, [job], job_view)
        stop.click(h.on_stop, [job], action)
        resume.click(h.on_resume, [job], action)
        delete.click(h.on_delete, [job], [action, job])
        merge.click(h.on_merge, [job], action)
        gguf.click(h.on_gguf, [job], action)
        seen = gr.State({})  # what this tab was last sent: unchanged parts are skipped
        timer.tick(
            h.on_tick,
            [job, seen],
            [table, job, *job_view, controls.picker, controls.chosen, seen],
        )
        demo.load(h.on_settings, fields, command)
    return demo


def launch(
    model: str | None,
    adapters: dict[str, str],
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    max_batch: int = 8,
    dtype: str | None = None,
    api_key: str | None = None,
    data_dir: str | None = None,
    runs_dir: str | None = None,
    max_jobs: int = 1,
) -> None:
    """Load the chat model and adapters once, then serve the Studio until interrupted. Jobs
    keep running when it stops; the next start finds them."""
    from loraforge.console import err_console
    from loraforge.infer.engine import Engine

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        err_console.print(
            f"[yellow]warning:[/yellow] the studio listens on {host} without --api-key: "
            "anyone who can reach it can train and use models"
        )
    home = studio_home()
    store = JobStore(home, Path(runs_dir) if runs_dir else None, max_running=max_jobs)
    store.start_scheduler()
    engine = Engine(model, adapters, dtype=dtype, max_batch=max_batch)
    try:
        demo = build_studio(
            engine,
            store,
            Path(data_dir) if data_dir else home / "data",
            default_chat=next(iter(adapters), None),
        )
        # Gradio runs one event at a time per handler unless told otherwise: let as many chats
        # stream at once as the engine batches
        demo.queue(default_concurrency_limit=max(max_batch, 4))
        demo.launch(
            server_name=host,
            server_port=port,
            css=CSS,
            show_error=True,
            auth=_password_check(api_key) if api_key else None,
        )
    finally:
        store.close()
        engine.close()
