"""CLI flags generated from pydantic models, and the hand-written flags several verbs share.

Why generate: ``SFTConfig`` is filled from YAML and from flags, and ``SamplingOptions`` is used
by five verbs; writing their flags by hand repeated every field's name, type and help, and let
them drift. ``model_options`` turns each field into one ``--field-name`` flag whose help is the
field's ``description``, so adding a field adds its flag.

How: typer reads a command's parameters from ``inspect.signature``. ``model_options`` puts one
keyword parameter per field in the verb's signature (``__signature__``), where the verb declares
its ``into`` parameter, and hands the verb the values as that one argument. A verb's other flags
(``--config``, ``-q/--query``, ...) stay ordinary typer parameters next to it.

Every generated flag defaults to None so that "the flag was given" is detectable: a YAML value
must only be overridden by a flag actually typed. ``--help`` shows the model's default (or the
verb's own, from ``defaults``).
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, Union, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from loraforge.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])

# ---- hand-written flags shared by several verbs -------------------------------------------------

MODEL = typer.Option(None, help="Base model (bundled name, HF dir, .gguf); checked vs adapter.")
ADAPTER = typer.Option(None, help="Adapter dir (its base model, template and system are used).")
DTYPE = typer.Option(
    None,
    help="Inference dtype: float32 | bfloat16 | int4 (bf16 with 4-bit weights when decoding: "
    "faster, answers differ slightly); default bfloat16.",
)
# the same words as SFTConfig.strict's, for the verbs that read a question or data file
STRICT = typer.Option(
    False, "--strict", help="Stop at the first bad record instead of skipping it."
)

# ---- flags generated from a model's fields ------------------------------------------------------


def flag(field: str) -> str:
    """The flag that sets a field: ``lora_rank`` -> ``--lora-rank``."""
    return "--" + field.replace("_", "-")


def cli_type(annotation: Any) -> Any:
    """The one type typer parses a field's flag as, since typer takes no unions: ``X | None``
    is X, ``bool | str`` a switch, ``str | list[str]`` the text (the model's validator parses
    it). ``list[X]`` makes a repeatable flag; ``Literal[...]`` shows and checks its choices."""
    if get_origin(annotation) not in (Union, types.UnionType):
        return annotation
    members = [a for a in get_args(annotation) if a is not type(None)]
    if bool in members:
        return bool
    return next((a for a in members if get_origin(a) is not list), members[0])


def _shown(value: Any, name: str) -> str | bool:
    """The default as --help shows it (the flag's own default is None, which shows nothing)."""
    if value is None or value == []:
        return False
    if isinstance(value, bool):  # a switch shows which side is on, as click does
        return flag(name)[2:] if value else "no-" + flag(name)[2:]
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _option(name: str, field: FieldInfo, default: Any) -> Any:
    switch = cli_type(field.annotation) is bool
    decl = f"{flag(name)}/--no-{flag(name)[2:]}" if switch else flag(name)
    return typer.Option(None, decl, help=field.description, show_default=_shown(default, name))


def model_options(
    model: type[BaseModel],
    into: str,
    *,
    build: bool = True,
    defaults: Mapping[str, Any] | None = None,
) -> Callable[[F], F]:
    """Give a verb one flag per field of ``model``; the verb receives them as its ``into``
    argument: a ``model`` built from ``defaults`` (this verb's own defaults) and the flags
    given, or with ``build=False`` the dict of the flags given (for a caller that merges them
    with a config file first). Use it below ``user_errors``: a bad value is a UserError."""
    defaults = dict(defaults or {})

    def decorate(fn: F) -> F:
        sig = inspect.signature(fn, eval_str=True)  # typer needs real types, not strings
        names = list(sig.parameters)
        own = [p.replace(kind=p.KEYWORD_ONLY) for p in sig.parameters.values() if p.name != into]
        clash = {p.name for p in own} & model.model_fields.keys()
        if clash:  # a programming error, met at import: say which names
            raise TypeError(f"{fn.__name__}: {clash} are both its own and {model.__name__}'s")
        generated = [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=_option(
                    name, f, defaults.get(name, f.get_default(call_default_factory=True))
                ),
                annotation=cli_type(f.annotation),
            )
            for name, f in model.model_fields.items()
        ]
        at = names.index(into)  # the generated flags take the place of ``into``

        @functools.wraps(fn)
        def verb(**kwargs: Any) -> Any:
            given = {k: kwargs.pop(k) for k in model.model_fields}
            given = {k: v for k, v in given.items() if v is not None and v != []}
            kwargs[into] = parse(model, {**defaults, **given}) if build else given
            return fn(**kwargs)

        params = [*own[:at], *generated, *own[at:]]
        verb.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        # typer also reads __annotations__ (copied from fn by wraps); make them match
        verb.__annotations__ = {p.name: p.annotation for p in params}
        return verb  # type: ignore[return-value]

    return decorate


# pydantic's error types, said the way a flag's error should read
_REASONS = {
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "finite_number": "must be a finite number",
}


def parse(model: type[BaseModel], values: Mapping[str, Any]) -> Any:
    """``model(**values)``, or a UserError naming the flag: ``--temperature -1.0: must be >= 0``."""
    try:
        return model(**values)
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else ""
        given = f" {values[name]}" if name in values else ""
        ctx = {k: f"{v:g}" if isinstance(v, float) else v for k, v in err.get("ctx", {}).items()}
        reason = _REASONS[err["type"]].format(**ctx) if err["type"] in _REASONS else err["msg"]
        raise UserError(f"{flag(name) if name else model.__name__}{given}: {reason}") from e
