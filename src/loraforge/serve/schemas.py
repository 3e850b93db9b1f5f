"""Request bodies of the OpenAI-compatible API, and OpenAI's error format.

Unknown fields are ignored (clients send ``user``, ``metadata``...), as vLLM and llama.cpp do;
fields we would have to get wrong (``suffix``) are a 400 naming them. Fields the spec makes
nullable take an explicit ``null`` as "the default".

``response_format`` (``json_object``, ``json_schema``; chat and completions) constrains the output
with a grammar (infer/constrain.py); a schema the engine cannot compile is a 400 with code
``invalid_schema``. ``logit_bias``, ``presence_penalty`` and ``frequency_penalty`` are applied
with OpenAI's formulas, ``top_k``, ``min_p`` and ``repetition_penalty`` as vLLM's extras.

Logprobs (chat's ``logprobs`` / ``top_logprobs``, completions' ``logprobs`` / ``echo``) are the
model's own: the log-softmax of the logits after the adapter, before penalties, logit_bias,
temperature, top-k / top-p / min-p and a grammar's mask (infer/logprobs.py). ``n`` choices of a
prompt share its prefill; with a ``seed``, choice i samples with seed + i.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# "developer" is OpenAI's newer name for "system"; "tool" carries a tool call's result.
ROLES = ("system", "developer", "user", "assistant", "tool")
# Continue's tab autocomplete sends 9-14 stop words; vLLM and llama.cpp take any number. Each one
# is checked after every token, so a bound still protects the server.
MAX_STOPS = 64
# OpenAI's bound on n; and on choices (prompts x n) per request, each a row of the batch to run
MAX_N = 128
MAX_CHOICES = 256


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


class FunctionCall(_Body):
    name: str
    arguments: str | dict = "{}"  # OpenAI sends JSON text; an object is taken as it is


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ToolDef(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(_Body):
    class _Name(_Body):
        name: str

    type: Literal["function"] = "function"
    function: _Name


class Message(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers

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

    def as_dict(self) -> dict:
        """The message as the engine renders it: role, text, and the tool parts it has."""
        out = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class StreamOptions(_Body):
    include_usage: bool = False


class JSONSchemaFormat(_Body):
    model_config = ConfigDict(populate_by_name=True)

    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    """``response_format``: the output constrained by a grammar (infer/constrain.py)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        given = self.json_schema is not None and self.json_schema.schema_
        if self.type == "json_schema" and not given:
            raise ValueError('type "json_schema" needs json_schema.schema (a JSON schema object)')
        return self

    def grammar(self):
        """The GrammarSpec, or None for "text"."""
        from loraforge.infer import constrain

        if self.type == "json_object":
            return constrain.json_object()
        if self.type == "json_schema":
            strict = bool(self.json_schema.strict)
            return constrain.json_schema(self.json_schema.schema_, strict=strict)
        return None


class _Sampling(_Body):
    """Fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    # vLLM's extensions, which the openai client passes through `extra_body`
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    min_p: float | None = Field(None, ge=0, le=1)
    # OpenAI's: over the generated tokens; logit_bias maps a token id (as text) to -100..100
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # torch generators take an int64
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, le=MAX_N)

    @field_validator("stream", "n", mode="after")
    @classmethod
    def _null_is_default(cls, v, info):
        # nullable in OpenAI's spec: some clients send "n": null or "stream": null
        return {"stream": False, "n": 1}[info.field_name] if v is None else v

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, v):
        for key, bias in (v or {}).items():
            if not key.lstrip("-").isdigit() or int(key) < 0:
                raise ValueError(f"logit_bias keys are token ids, got '{key}'")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values are -100..100, got {bias} for {key}")
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
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted; a forced call is one call
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:  # OpenAI's rule
            raise APIError(
                400,
                "top_logprobs: logprobs must be true to use top_logprobs",
                param="top_logprobs",
                code="invalid_value",
            )
        return self

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, v: list[Message]) -> list[Message]:
        if not v:
            raise ValueError("messages must not be empty")
        return v


class CompletionRequest(_Sampling):
    # a string, several, a prompt as token ids, or several of those (lm-evaluation-harness)
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5)  # OpenAI's bound on the legacy endpoint
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], int):
            v = [v]  # one prompt of token ids
        prompts = [v] if isinstance(v, str) else v
        if not prompts or any(not p for p in prompts):
            raise ValueError("prompt must not be empty")
        return prompts

    @model_validator(mode="after")
    def _choices(self):
        if len(self.prompt) * self.n > MAX_CHOICES:
            raise APIError(
                400,
                f"n: {len(self.prompt)} prompts x n={self.n} is more than the "
                f"{MAX_CHOICES} choices one request may ask for",
                param="n",
                code="invalid_value",
            )
        return self

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
