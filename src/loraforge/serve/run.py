"""Starting `loraforge serve`: parse ``--adapter`` specs, load the engine once, run uvicorn."""

from __future__ import annotations

from pathlib import Path

from loraforge.serve.app import create_app


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """``--adapter NAME=PATH`` (or a bare PATH, named after its dir) into {name: path}."""
    from loraforge.errors import UserError

    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).resolve().name, spec
        if not name or not path:
            raise UserError(f"--adapter {spec}: expected NAME=PATH")
        if name in out:
            raise UserError(f"--adapter {spec}: the name '{name}' is given twice")
        out[name] = path
    return out


def serve(
    model: str | None,
    adapters: dict[str, str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    adapter_root: str | None = None,
    max_tokens_limit: int = 4096,
    max_batch: int = 8,
    max_queue: int = 256,
    dtype: str | None = None,
    cors_origins: list[str] | None = None,
    log_level: str = "info",
) -> None:
    """Load the base model and adapters once, then serve until interrupted."""
    import uvicorn

    from loraforge.console import console
    from loraforge.errors import UserError
    from loraforge.infer.engine import Engine

    if adapter_root is not None and not Path(adapter_root).is_dir():
        raise UserError(f"--adapter-root {adapter_root}: no such directory")
    engine = Engine(model, adapters, dtype=dtype, max_batch=max_batch, max_queue=max_queue)
    try:
        default = next(iter(adapters), None)
        app = create_app(
            engine,
            api_key=api_key,
            adapter_root=adapter_root,
            default_model=default,
            max_tokens_limit=max_tokens_limit,
            cors_origins=cors_origins,
        )
        names = ", ".join([engine.base_name, *engine.adapter_names()])
        console.print(f"serving {names} on http://{host}:{port}/v1")
        if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
            console.print("[yellow]warning:[/yellow] listening beyond localhost without --api-key")
        # Connections beyond what the engine can hold get uvicorn's 503 at once, so a flood of
        # (or slowly sending) clients cannot take every socket and thread; an idle keep-alive
        # connection is closed after 5 s.
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level=log_level,
            limit_concurrency=max_queue + max_batch + 64,
            timeout_keep_alive=5,
        )
    finally:
        engine.close()
