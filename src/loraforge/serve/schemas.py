"""Request bodies of the OpenAI-compatible API, and OpenAI's error format.

Unknown fields are ignored (clients send ``user``, ``metadata``...), as vLLM and llama.cpp do;
fields we would have to get wrong (``n > 1``, ``logprobs``) are a 400 naming them. Fields the spec
makes nullable take an explicit ``null`` as "the default".
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# "developer" is OpenAI's newer name for "system"; "tool" needs tool calls, which we do not do.
ROLES = ("system", "developer", "user", "assistant")
# Continue's tab autocomplete sends 9-14 stop words; vLLM and llama.cpp take any number. Each one
# is checked after every token, so a bound still protects the server.
MAX_STOPS = 64


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status,
            message,
            param,
            code,
            type,
        )

    def body(self) -> dict:
        return error_body(self.message, param=self.param, code=self.code, type=self.type)


def error_body(
    message: str,
    *,
    param: str | None = None,
    code: str | int | None = None,
    type: str = "invalid_request_error",
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _lone_surrogate(data) -> str | None:
    """The dotted path of the first string in ``data`` that is not valid Unicode (holds a lone
    surrogate, which JSON's "\\ud800" escape can carry), else None. A loop, not recursion: the
    JSON may be nested as deep as the parser allows."""
    stack = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return path.encode("utf-8", "backslashreplace").decode("utf-8")
        elif isinstance(value, dict):
            for k, v in value.items():
                sub = f"{path}.{k}" if path else str(k)
                stack += [(k, sub), (v, sub)]
        elif isinstance(value, list | tuple):
            stack += [(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value)]
    return None


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        # Bug fix: a lone surrogate in a string (e.g. {"content": "\\ud800"}) passed pydantic's
        # plain str fields, then the tokenizer (TypeError) or the UTF-8 encoding of a response
        # naming it (the 404 for such a "model") failed: a 500. Refused here as a 400 naming the
        # field; APIError is not a ValueError, so pydantic lets it through to its handler as is.
        where = _lone_surrogate(data)
        if where is not None:
            raise APIError(
                400,
                f"{where or 'body'}: invalid Unicode (a lone surrogate)",
                param=where or None,
                code="invalid_unicode",
            )
        return data


class ContentPart(_Body):
    type: str
    text: str | None = None


class Message(_Body):
    role: str
    content: str | list[ContentPart] | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, v: str) -> str:
        if v not in ROLES:
            raise ValueError(f"unknown role '{v}'; expected one of {', '.join(ROLES)}")
        return v

    def text(self) -> str:
        from loraforge.data.formats import RecordProblem, content_text

        parts = self.content
        if isinstance(parts, list):
            parts = [p.model_dump(exclude_none=True) for p in parts]
        try:
            return content_text(parts, "messages[].content")
        except RecordProblem as e:
            raise APIError(400, str(e), param="messages", code="invalid_content") from None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    # vLLM's extensions, which the openai client passes through `extra_body`
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # torch generators take an int64
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    logprobs: bool | int | None = None

    @field_validator("stream", "n", mode="after")
    @classmethod
    def _null_is_default(cls, v, info):
        # nullable in OpenAI's spec: some clients send "n": null or "stream": null
        return {"stream": False, "n": 1}[info.field_name] if v is None else v

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("logprobs are not supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"stop takes at most {MAX_STOPS} strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops


class ChatCompletionRequest(_Sampling):
    messages: list[Message]
    # the newer name OpenAI's clients send instead of max_tokens
    max_completion_tokens: int | None = Field(None, ge=1)

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, v: list[Message]) -> list[Message]:
        if not v:
            raise ValueError("messages must not be empty")
        return v


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("give one prompt (a string or a list of one string)")
            v = v[0]
        if not v:
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported")
        return v


class HistoryTurn(_Body):
    role: Literal["system", "user", "assistant"]
    content: str


class SimpleChatRequest(_Body):
    """``POST /chat``: the shape tutorials use; history is [{role, content}] or [[user, bot]]."""

    message: str = Field(min_length=1)
    history: list[HistoryTurn | tuple[str, str]] = []
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    model: str | None = None

    def messages(self) -> list[dict]:
        out = []
        for turn in self.history:
            if isinstance(turn, HistoryTurn):
                out.append({"role": turn.role, "content": turn.content})
            else:
                out += [
                    {"role": "user", "content": turn[0]},
                    {"role": "assistant", "content": turn[1]},
                ]
        return out + [{"role": "user", "content": self.message}]


class LoadAdapterRequest(_Body):
    lora_name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][\w.\-]*$")
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(_Body):
    lora_name: str = Field(min_length=1)
