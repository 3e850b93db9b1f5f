"""`loraforge serve` (loraforge.serve.run: the OpenAI-compatible API) and `loraforge studio`
(loraforge.webui.app: the Gradio Studio; `webui` is its former name)."""

from __future__ import annotations

import typer

from loraforge.cli import user_errors
from loraforge.cli.options import DTYPE

app = typer.Typer()

ADAPTERS = typer.Option(
    [],
    "--adapter",
    help="NAME=PATH of an adapter dir (repeatable); a bare PATH is named by its dir.",
)
BASE = typer.Option(
    None, "--model", help="Base model (default: the first adapter's base, else smollm2-135m)."
)
HOST = typer.Option("127.0.0.1", help="Address to bind (beyond localhost: set --api-key).")
MAX_BATCH = typer.Option(8, help="Requests decoded together.")


@app.command()
@user_errors
def serve(
    model: str = BASE,
    adapter: list[str] = ADAPTERS,
    host: str = HOST,
    port: int = typer.Option(8000, help="Port to bind."),
    api_key: str = typer.Option(
        None, envvar="LORAFORGE_API_KEY", help="Require 'Authorization: Bearer KEY'."
    ),
    adapter_root: str = typer.Option(
        None, help="Dir that /v1/load_lora_adapter may load from (off without it)."
    ),
    max_tokens: int = typer.Option(4096, help="Largest max_tokens a request may ask for."),
    max_batch: int = MAX_BATCH,
    max_queue: int = typer.Option(256, help="Queued requests before answering 503."),
    cors_origin: list[str] = typer.Option(
        None, help="Browser origin allowed to call the API (repeatable; '*' for any; off)."
    ),
    dtype: str = DTYPE,
    backend: str = typer.Option(
        "loraforge", help="loraforge (its own engine) | vllm (vLLM's server behind the same API)."
    ),
    vllm_python: str = typer.Option(
        None,
        envvar="LORAFORGE_VLLM_PYTHON",
        help="Python of the venv that has vLLM (default: .venv-vllm/bin/python if present).",
    ),
) -> None:
    """OpenAI-compatible API: one base model, many adapters picked by the request's model."""
    from loraforge.errors import UserError, require

    require("fastapi", "serve")
    require("uvicorn", "serve")
    from loraforge.serve.run import parse_adapters

    if backend == "vllm":
        from loraforge.serve.vllm_backend import serve_vllm

        return serve_vllm(
            model,
            parse_adapters(adapter),
            host=host,
            port=port,
            api_key=api_key,
            adapter_root=adapter_root,
            max_batch=max_batch,
            dtype=dtype,
            cors_origins=cors_origin,
            vllm_python=vllm_python,
        )
    if backend != "loraforge":
        raise UserError(f"--backend {backend}: loraforge or vllm")
    from loraforge.serve.run import serve as run_server

    run_server(
        model,
        parse_adapters(adapter),
        host=host,
        port=port,
        api_key=api_key,
        adapter_root=adapter_root,
        max_tokens_limit=max_tokens,
        max_batch=max_batch,
        max_queue=max_queue,
        dtype=dtype,
        cors_origins=cors_origin,
    )


@app.command()
@user_errors
def studio(
    model: str = BASE,
    adapter: list[str] = ADAPTERS,
    host: str = HOST,
    port: int = typer.Option(7860, help="Port to bind."),
    max_batch: int = MAX_BATCH,
    api_key: str = typer.Option(
        None, envvar="LORAFORGE_API_KEY", help="Ask for this password (any user name) to log in."
    ),
    dtype: str = DTYPE,
    data_dir: str = typer.Option(
        None, help="Dir of dataset files to pick from; uploads go here (default: studio home)."
    ),
    runs_dir: str = typer.Option(
        None, help="Where jobs write their adapter dirs (default: $LORAFORGE_HOME/studio/runs)."
    ),
    max_jobs: int = typer.Option(1, min=1, help="Jobs training at once; the rest wait."),
) -> None:
    """The Studio in the browser: data check, training jobs, chat and compare, merge."""
    from loraforge.errors import require

    require("gradio", "webui")
    from loraforge.serve.run import parse_adapters
    from loraforge.webui.app import launch

    launch(
        model,
        parse_adapters(adapter),
        host=host,
        port=port,
        max_batch=max_batch,
        dtype=dtype,
        api_key=api_key,
        data_dir=data_dir,
        runs_dir=runs_dir,
        max_jobs=max_jobs,
    )


# the verb's former name, kept so existing scripts and muscle memory still work
app.command("webui", hidden=True, help="The same as `loraforge studio`.")(studio)
