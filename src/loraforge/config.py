"""The `sft` run configuration: one pydantic model that a YAML file and the CLI flags both fill.

Flag names are the field names with dashes (``--lora-rank`` sets ``lora_rank``); a flag given on
the command line overrides the same field from ``--config run.yaml``. The defaults teach the
bundled 135M model a new identity on a 2-core CPU in a few minutes (≈ 90 optimizer steps with
LoRA r=8, α=32 on all linear layers, lr 2e-4, batch 4): step count, not epochs, is what a
small run must budget.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loraforge.errors import UserError


class ConfigError(UserError):
    """A config file or flag value that does not validate."""


class SFTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # what to train on
    model: str = "smollm2-135m"
    dataset: list[str] = Field(default_factory=lambda: ["selfcog"])
    val_dataset: list[str] = Field(default_factory=list)
    val_split: float = Field(0.05, ge=0.0, lt=1.0)
    template: str | None = None
    system: str | None = None  # None: loraforge.data.tokenize.DEFAULT_SYSTEM
    max_length: int = Field(1024, gt=8)
    model_name: str | None = None
    model_author: str | None = None
    output: Path = Path("runs/sft")

    # LoRA
    lora_rank: int = Field(8, gt=0)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False

    # optimisation
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_grad_norm: float = Field(1.0, ge=0)  # 0 disables clipping
    epochs: float = Field(4, gt=0)
    max_steps: int | None = Field(None, gt=0)  # overrides epochs when set
    seed: int = 42
    gradient_checkpointing: bool = False

    # speed: packing + bf16 autocast + bf16 frozen base + sparse chunked loss; --no-fast is
    # the plain fp32 path (padded batches, full logits) kept as the reference.
    fast: bool = True
    pack_length: int = Field(2048, gt=8)  # longest packed row; longer batches split into rows

    # bookkeeping
    logging_steps: int = Field(5, gt=0)
    eval_steps: int = Field(20, gt=0)
    save_steps: int = Field(20, gt=0)
    save_total_limit: int = Field(2, ge=1)
    resume: bool | str = False  # True / "auto": newest checkpoint in output; or a checkpoint dir
    overwrite: bool = False  # start afresh in an output dir that holds checkpoints

    @field_validator("dataset", "val_dataset", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("target_modules", mode="before")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        return parse_target_modules(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> SFTConfig:
        if not self.dataset:
            raise ValueError("dataset: give at least one dataset")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules: empty list")
        return self

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def parse_target_modules(text: str) -> str | list[str]:
    """``all-linear`` | ``q_proj,v_proj`` (a list of module-name suffixes) | a regex (PEFT
    full-matches a string against each module name)."""
    text = text.strip()
    if text == "all-linear" or any(c in text for c in "^$*+?()[]|\\"):
        return text
    return [s.strip() for s in text.split(",") if s.strip()]


def load_config(path: str | Path | None = None, **overrides: Any) -> SFTConfig:
    """Fields from ``path`` (YAML), then ``overrides`` that are not None; one-line errors."""
    data: dict[str, Any] = {}
    where = "flags"
    if path is not None:
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise ConfigError(f"--config: {p} not found")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}{line}: invalid YAML ({getattr(e, 'problem', e)})") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of field: value at the top level")
        data = {str(k).replace("-", "_"): v for k, v in loaded.items()}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return SFTConfig(**data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "config"
        top = str(err["loc"][0]) if err["loc"] else ""
        if overrides.get(top) is not None:
            source = "flag --" + top.replace("_", "-")
        elif path is not None:
            source = where + _line_of(Path(path).read_text(), top)
        else:
            source = where
        raise ConfigError(f"{source}: {field}: {err['msg']}") from e


def _line_of(text: str, key: str) -> str:
    """' line N' where ``key`` (or its dashed form) is set at the top level of a YAML text."""
    pattern = re.compile(rf"^({re.escape(key)}|{re.escape(key.replace('_', '-'))})\s*:")
    for n, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return f" line {n}"
    return ""
