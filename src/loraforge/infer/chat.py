"""`loraforge chat`: an interactive multi-turn REPL, or one question answered and exit (-q).

Everything goes through the Engine, so prompts are rendered with the chat template and default
system prompt recorded in the adapter dir at training time (no train/serve drift). A ``--system``
given here, or ``/system TEXT`` in the REPL, replaces that default for the session.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import TextIO

from loraforge.errors import UserError

HELP = (
    "commands: /reset (forget the conversation), /system TEXT (set the system prompt; "
    "/system alone restores the default), /exit (or Ctrl-D)"
)


class ChatSession:
    """A conversation's history, rendered by the engine through the chat template each turn."""

    def __init__(self, engine, params, adapter: str | None = None, system: str | None = None):
        self.engine, self.params, self.adapter = engine, params, adapter
        self.system = system  # None: the engine's (adapter's) recorded default
        self.history: list[dict] = []

    def messages(self, user: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.history, {"role": "user", "content": user}]

    def ask(self, user: str) -> Iterator[str]:
        """Stream the answer's text deltas. The turn joins the history when the answer ends, or
        with the part produced so far when the reader stops early (Ctrl-C); not on an error."""
        parts: list[str] = []
        stream = self.engine.stream(self.messages(user), self.params, adapter=self.adapter)
        try:
            for delta in stream:
                parts.append(delta)
                yield delta
        except Exception:
            stream.close()
            raise
        except BaseException:  # KeyboardInterrupt, or the reader closed us (GeneratorExit)
            stream.close()
            self._remember(user, "".join(parts))
            raise
        self._remember(user, "".join(parts))

    def _remember(self, user: str, answer: str) -> None:
        self.history += [
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]

    def reset(self) -> None:
        self.history = []


def one_shot(session: ChatSession, question: str, out: TextIO | None = None) -> str:
    """Answer one question, streaming it to ``out``; return the full answer."""
    out = out or sys.stdout
    parts = []
    for delta in session.ask(question):
        parts.append(delta)
        out.write(delta)
        out.flush()
    out.write("\n")
    out.flush()
    return "".join(parts)


def repl(
    session: ChatSession,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
    prompt: str = ">>> ",
) -> None:
    """The interactive loop: read a line, handle /commands, stream the answer."""
    out = out or sys.stdout
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    out.write(
        f"chatting with {session.engine.base_name}"
        f"{' + adapter' if session.adapter else ''}; {HELP}\n"
    )
    out.flush()
    while True:
        try:
            line = read(prompt)
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, keep chatting
            out.write("\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/exit", "/quit"):
                return
            if cmd == "/reset":
                session.reset()
                out.write("(conversation cleared)\n")
            elif cmd == "/system":
                session.system = arg.strip() or None
                shown = session.system if session.system else "the default"
                out.write(f"(system prompt: {shown})\n")
            else:
                out.write(f"unknown command {cmd}; {HELP}\n")
            out.flush()
            continue
        try:
            one_shot(session, text, out)
        except KeyboardInterrupt:  # Ctrl-C while answering: stop this answer only
            out.write("\n(interrupted)\n")
        except UserError as e:  # e.g. the history outgrew the context: say so, keep chatting
            out.write(f"\nerror: {e} (/reset starts afresh)\n")
        out.flush()
