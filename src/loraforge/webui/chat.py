"""The Studio's Chat and Compare tabs over one Engine (the former `loraforge webui`).

Replies go through ``Engine.submit`` like the API server's: several browser tabs, or the
columns of the compare tab, are decoded in one batch. Stopping a reply (or closing the tab)
cancels it. The chat keeps its conversation as OpenAI messages (webui/conversation.py): with
tools given, a tool call the model makes is shown as such, and the person pastes the tool's
result back for the model to answer from, as an agent loop would. The adapter list changes
while the page is open (a finished job's adapter is loaded into the engine), so the handlers
read it at call time and the compare tab has a fixed number of columns shown as needed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

COMPARE_COLUMNS = 4  # base + 3 adapters side by side; more would be too narrow to read


def _params(temperature: float, top_p: float, max_tokens: float, seed):
    from loraforge.infer.sampling import SamplingOptions

    return SamplingOptions(
        max_new_tokens=int(max_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
        seed=None if seed in (None, "") or int(seed) < 0 else int(seed) % 2**63,
    ).to_params()


def model_names(engine) -> list[str]:
    return [engine.base_name, *engine.adapter_names()]


@dataclass
class ChatControls:
    picker: Any  # the Chat tab's model dropdown
    chosen: Any  # the Compare tab's model checkboxes


def chat_tabs(engine, default_model: str | None = None) -> ChatControls:
    """Add the Chat and Compare tabs to the gr.Blocks being built."""
    import gradio as gr

    from loraforge.errors import UserError
    from loraforge.webui.conversation import (
        add_tool_result,
        call_label,
        example_tools,
        parse_tools,
        pending_calls,
        reply,
        view,
    )

    base = engine.base_name
    models = model_names(engine)

    def start(messages: list[dict], name: str, params):
        adapter = None if name in (None, "", base) else name
        try:
            return engine.submit(engine.encode(messages, adapter), params, adapter)
        except UserError as e:  # busy engine, prompt too long, unloaded adapter
            raise gr.Error(str(e)) from None

    def user_turn(message: str, conv: list[dict]):
        if not message or not message.strip():
            raise gr.Error("Type a message first.")
        conv = [*conv, {"role": "user", "content": message.strip()}]
        return "", conv, view(conv)

    def tool_turn(result: str, conv: list[dict]):
        try:
            conv = add_tool_result(conv, result)
        except UserError as e:
            raise gr.Error(str(e)) from None
        return "", conv, view(conv)

    def bot_turn(conv, name, system, tools_text, temperature, top_p, max_tokens, seed):
        """Yields (conversation, chat box, result panel, result box label) as the answer grows."""
        if not conv or conv[-1]["role"] == "assistant":
            return  # nothing to answer (the user turn was refused)
        adapter = None if name in (None, "", base) else name
        params = _params(temperature, top_p, max_tokens, seed)
        try:
            tools = parse_tools(tools_text)
            answers = reply(engine, conv, adapter, params, tools, (system or "").strip() or None)
            for now in answers:
                waiting = pending_calls(now)
                label = f"Result of {call_label(waiting[0])}" if waiting else "Tool result"
                yield now, view(now), gr.Group(visible=bool(waiting)), gr.Textbox(label=label)
        except UserError as e:  # bad tools, busy engine, prompt too long, unloaded adapter
            raise gr.Error(str(e)) from None

    def compare(question: str, chosen: list[str], temperature, top_p, max_tokens, seed):
        if not question or not question.strip():
            raise gr.Error("Type a question first.")
        params = _params(temperature, top_p, max_tokens, seed)
        messages = [{"role": "user", "content": question}]
        names = [n for n in model_names(engine) if n in chosen][:COMPARE_COLUMNS]
        # all submitted at once, so they are decoded in one batch
        handles = {name: start(messages, name, params) for name in names}
        texts = dict.fromkeys(handles, "")

        def drain(name: str) -> None:
            for delta in handles[name]:
                texts[name] += delta

        readers = [threading.Thread(target=drain, args=(n,), daemon=True) for n in handles]
        for t in readers:
            t.start()

        def snapshot():
            return [
                gr.Textbox(value=texts[names[i]], label=names[i], visible=True)
                if i < len(names)
                else gr.Textbox(value="", visible=False)
                for i in range(COMPARE_COLUMNS)
            ]

        try:
            while any(t.is_alive() for t in readers):
                yield snapshot()
                time.sleep(0.1)
            yield snapshot()
        finally:
            for h in handles.values():
                h.cancel()

    with gr.Tab("Chat"):
        with gr.Row():
            picker = gr.Dropdown(
                models,
                value=default_model if default_model in models else models[-1],
                label="Model (base or adapter)",
                elem_id="model-picker",
            )
            system = gr.Textbox(label="System prompt (blank: the adapter's own)", elem_id="system")
        with gr.Accordion("Sampling", open=False):
            temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature")
            top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p")
            max_tokens = gr.Slider(1, 2048, value=256, step=1, label="Max new tokens")
            seed = gr.Number(-1, precision=0, label="Seed (-1: random)", elem_id="seed")
        with gr.Accordion("Tools (function calling)", open=False):
            tools_box = gr.Textbox(
                label="Tools: a JSON list of OpenAI tool definitions (blank: none)",
                lines=6,
                elem_id="chat-tools",
            )
            example = gr.Button("Weather + currency example", size="sm", elem_id="tools-example")
        conv = gr.State([])
        chatbot = gr.Chatbot(elem_id="chatbot", height=420)
        with gr.Group(visible=False, elem_id="tool-panel") as tool_panel:
            result = gr.Textbox(label="Tool result", lines=2, elem_id="tool-result")
            send_result = gr.Button("Send tool result", variant="primary", elem_id="tool-send")
        with gr.Row():
            box = gr.Textbox(
                placeholder="Type a message…", show_label=False, scale=6, elem_id="chat-input"
            )
            send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
            stop = gr.Button("Stop", scale=1, elem_id="chat-stop")
            clear = gr.Button("Clear", scale=1, elem_id="chat-clear")
        answer_in = [conv, picker, system, tools_box, temperature, top_p, max_tokens, seed]
        answer_out = [conv, chatbot, tool_panel, result]
        turns = [
            box.submit(user_turn, [box, conv], [box, conv, chatbot]),
            send.click(user_turn, [box, conv], [box, conv, chatbot]),
            send_result.click(tool_turn, [result, conv], [result, conv, chatbot]),
        ]
        answers = [t.success(bot_turn, answer_in, answer_out) for t in turns]
        stop.click(None, cancels=answers)
        clear.click(lambda: ([], [], gr.Group(visible=False)), None, [conv, chatbot, tool_panel])
        example.click(example_tools, None, tools_box)
    with gr.Tab("Compare"):
        question = gr.Textbox(label="Question", elem_id="compare-question")
        chosen = gr.CheckboxGroup(models, value=models, label="Models", elem_id="compare-models")
        with gr.Row():
            c_temp = gr.Slider(0, 2, value=0.0, step=0.05, label="Temperature")
            c_top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p")
            c_max = gr.Slider(1, 2048, value=256, step=1, label="Max new tokens")
            c_seed = gr.Number(0, precision=0, label="Seed (same for all)")
        go = gr.Button("Compare", variant="primary", elem_id="compare-go")
        with gr.Row():
            boxes = [
                gr.Textbox(
                    label=models[i] if i < len(models) else "",
                    lines=8,
                    interactive=False,
                    visible=i < len(models),
                    elem_id=f"compare-{i}",
                )
                for i in range(COMPARE_COLUMNS)
            ]
        go.click(compare, [question, chosen, c_temp, c_top_p, c_max, c_seed], boxes)
    return ChatControls(picker, chosen)
