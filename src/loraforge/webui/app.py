"""`loraforge webui`: a Gradio app over one Engine: chat with any adapter, and a compare tab.

Gradio takes seconds to import, so only this module imports it, and only when called. Replies
go through ``Engine.submit`` like the API server's: several browser tabs, or the columns of the
compare tab, are decoded in one batch. Stopping a reply (or closing the tab) cancels it.
"""

from __future__ import annotations

import os
import threading
import time

CSS = "footer {display: none !important}"


def _text(content) -> str:
    """Gradio 6 gives message content as [{"type": "text", "text": ...}, ...] (or a str); file
    parts carry no text and are left out."""
    from loraforge.data.formats import content_text

    return content_text(content, skip_other=True)


def _params(temperature: float, top_p: float, max_tokens: float, seed):
    from loraforge.infer.sampling import SamplingOptions

    return SamplingOptions(
        max_new_tokens=int(max_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
        seed=None if seed in (None, "") or int(seed) < 0 else int(seed) % 2**63,
    ).to_params()


def _password_check(key: str):
    """Gradio's login: any user name, the key as password (compared in constant time)."""
    import secrets

    def check(_user: str, password: str) -> bool:
        return secrets.compare_digest(password.encode(), key.encode())

    return check


def build_ui(engine, default_model: str | None = None):
    """The Gradio Blocks app (not launched). ``engine`` follows loraforge.infer.engine.Engine."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from loraforge.errors import UserError

    base = engine.base_name
    models = [base, *engine.adapter_names()]

    def adapter_of(name: str) -> str | None:
        return None if name in (None, "", base) else name

    def start(messages: list[dict], name: str, params):
        adapter = adapter_of(name)
        try:
            return engine.submit(engine.encode(messages, adapter), params, adapter)
        except UserError as e:  # busy engine, prompt too long, unloaded adapter
            raise gr.Error(str(e)) from None

    def chat(message: str, history: list, model, system, temperature, top_p, max_tokens, seed):
        messages = [{"role": m["role"], "content": _text(m["content"])} for m in history]
        messages.append({"role": "user", "content": _text(message)})
        if system and system.strip():  # else the adapter's own training-time system prompt
            messages.insert(0, {"role": "system", "content": system.strip()})
        handle = start(messages, model, _params(temperature, top_p, max_tokens, seed))
        text = ""
        try:
            for delta in handle:
                text += delta
                yield text
        finally:
            handle.cancel()  # a no-op once finished; stops generation if the user pressed stop

    def compare(question: str, chosen: list[str], temperature, top_p, max_tokens, seed):
        if not question or not question.strip():
            raise gr.Error("Type a question first.")
        params = _params(temperature, top_p, max_tokens, seed)
        messages = [{"role": "user", "content": question}]
        # all submitted at once, so they are decoded in one batch
        handles = {name: start(messages, name, params) for name in models if name in chosen}
        texts = dict.fromkeys(handles, "")

        def drain(name: str) -> None:
            for delta in handles[name]:
                texts[name] += delta

        readers = [threading.Thread(target=drain, args=(n,), daemon=True) for n in handles]
        for t in readers:
            t.start()

        def snapshot():
            return [gr.Textbox(value=texts.get(n, ""), visible=n in handles) for n in models]

        try:
            while any(t.is_alive() for t in readers):
                yield snapshot()
                time.sleep(0.1)
            yield snapshot()
        finally:
            for h in handles.values():
                h.cancel()

    with gr.Blocks(title="loraforge", analytics_enabled=False) as demo:
        gr.Markdown(f"## loraforge · base model `{base}`")
        with gr.Tab("Chat"):
            with gr.Row():
                picker = gr.Dropdown(
                    models,
                    value=default_model if default_model in models else models[-1],
                    label="Model (base or adapter)",
                    elem_id="model-picker",
                )
                system = gr.Textbox(
                    label="System prompt (blank: the adapter's own)", elem_id="system"
                )
            with gr.Accordion("Sampling", open=False):
                temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature")
                top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p")
                max_tokens = gr.Slider(1, 2048, value=256, step=1, label="Max new tokens")
                seed = gr.Number(-1, precision=0, label="Seed (-1: random)", elem_id="seed")
            gr.ChatInterface(
                chat,
                additional_inputs=[picker, system, temperature, top_p, max_tokens, seed],
                chatbot=gr.Chatbot(elem_id="chatbot", height=420),
                textbox=gr.Textbox(placeholder="Type a message…", elem_id="chat-input"),
                fill_height=False,
            )
        with gr.Tab("Compare"):
            question = gr.Textbox(label="Question", elem_id="compare-question")
            chosen = gr.CheckboxGroup(models, value=models, label="Models")
            with gr.Row():
                c_temp = gr.Slider(0, 2, value=0.0, step=0.05, label="Temperature")
                c_top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p")
                c_max = gr.Slider(1, 2048, value=256, step=1, label="Max new tokens")
                c_seed = gr.Number(0, precision=0, label="Seed (same for all)")
            go = gr.Button("Compare", variant="primary", elem_id="compare-go")
            with gr.Row():
                boxes = [
                    gr.Textbox(label=n, lines=8, interactive=False, elem_id=f"compare-{i}")
                    for i, n in enumerate(models)
                ]
            go.click(compare, [question, chosen, c_temp, c_top_p, c_max, c_seed], boxes)
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
) -> None:
    """Load the base model and adapters once, then serve the UI until interrupted."""
    from loraforge.console import err_console
    from loraforge.infer.engine import Engine

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        err_console.print(
            f"[yellow]warning:[/yellow] the web UI listens on {host} without --api-key: "
            "anyone who can reach it can use the model"
        )
    engine = Engine(model, adapters, dtype=dtype, max_batch=max_batch)
    try:
        demo = build_ui(engine, default_model=next(iter(adapters), None))
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
        engine.close()
