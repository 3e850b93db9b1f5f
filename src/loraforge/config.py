"""The settings a user gives: the `sft` run (``SFTConfig``) and sampling (``SamplingOptions``).

Both are pydantic models whose fields are also the CLI's flags (cli/options.py generates them,
with each field's ``description`` as help), so a field, its flag and its YAML key cannot drift.

Flag names are the field names with dashes (``--lora-rank`` sets ``lora_rank``); a flag given on
the command line overrides the same field from ``--config run.yaml``. The defaults teach the
bundled 135M model a new identity on a 2-core CPU in a few minutes (≈ 90 optimizer steps with
LoRA r=8, α=32 on all linear layers, lr 2e-4, batch 4): step count, not epochs, is what a
small run must budget.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loraforge.errors import UserError

if TYPE_CHECKING:
    from loraforge.infer.sampling import SamplingParams


class ConfigError(UserError):
    """A config file or flag value that does not validate."""


class SFTConfig(BaseModel):
    """Every field is also a flag of ``loraforge sft`` (cli/options.py generates them from this
    class), with its ``description`` as the flag's help."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # what to train on
    model: str = Field(
        "smollm2-135m", description="Base model: bundled name, HF dir or .gguf file."
    )
    dataset: list[str] = Field(
        default_factory=lambda: ["selfcog"],
        description="Dataset file/dir, or 'selfcog' (repeatable, or comma-separated).",
    )
    val_dataset: list[str] = Field(
        default_factory=list, description="Validation dataset (repeatable); replaces --val-split."
    )
    val_split: float = Field(
        0.05, ge=0.0, lt=1.0, description="Fraction held out for validation (seeded)."
    )
    template: str | None = Field(
        None, description="Chat template: 'chatml', a file or Jinja text (default: the model's)."
    )
    system: str | None = Field(  # None: loraforge.data.tokenize.DEFAULT_SYSTEM
        None, description="System prompt for conversations without one (default: loraforge's)."
    )
    thinking: bool | None = Field(  # written into the recorded template: chat renders the same
        None,
        description="Templates with an enable_thinking switch (Qwen3): thinking on or off, at "
        "training and chat time alike (default: the template's own).",
    )
    # keep: train what the data says (Qwen3's template itself drops the reasoning of earlier
    # turns); strip: answers only, e.g. a reasoning model's data for a model meant to answer.
    think: Literal["keep", "strip"] = Field(
        "keep", description="<think>...</think> blocks in training answers: keep or strip."
    )
    max_length: int = Field(1024, gt=8, description="Truncate examples to this many tokens.")
    model_name: str | None = Field(None, description="Name the selfcog set teaches.")
    model_author: str | None = Field(None, description="Author the selfcog set teaches.")
    output: Path = Field(
        Path("runs/sft"), description="Output dir (adapter, checkpoints, metrics)."
    )

    # LoRA
    lora_rank: int = Field(8, gt=0, description="LoRA rank r: the size of the low-rank update.")
    lora_alpha: float = Field(
        32, gt=0, description="LoRA alpha: the update is scaled by alpha / r (rsLoRA: / sqrt r)."
    )
    lora_dropout: float = Field(
        0.05, ge=0.0, lt=1.0, description="Dropout on the input of the LoRA layers."
    )
    target_modules: str | list[str] = Field(
        "all-linear", description="Layers to adapt: all-linear | q_proj,v_proj | a regex."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA: scale by alpha / sqrt(r).")
    use_dora: bool = Field(False, description="DoRA: LoRA plus a trained magnitude per output.")
    # QLoRA: the frozen base's linear layers in bitsandbytes' 4 or 8 bits (models.py)
    quantization: Literal["nf4", "fp4", "int8"] | None = Field(
        None, description="QLoRA: hold the frozen base in nf4 | fp4 | int8 (needs bitsandbytes)."
    )

    # optimisation
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate schedule after the warmup."
    )
    warmup_ratio: float = Field(
        0.03, ge=0.0, lt=1.0, description="Share of the steps that ramp the learning rate up."
    )
    batch_size: int = Field(4, gt=0, description="Examples per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_grad_norm: float = Field(
        1.0, ge=0, description="Clip the gradient norm to this; 0 turns clipping off."
    )
    epochs: float = Field(4, gt=0, description="Passes over the training set (may be fractional).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides --epochs.")
    seed: int = Field(42, description="Seed of the data order, validation split and LoRA init.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, slower."
    )
    # > 1: sft re-launches itself through torchrun (train/distributed.py); under a launcher
    # (torchrun, accelerate launch) the launcher's process count is used instead
    nproc: int = Field(1, ge=1, description="Processes (DDP, gloo on CPU); each takes a shard.")

    # speed: packing + bf16 autocast + bf16 frozen base + sparse chunked loss; --no-fast is
    # the plain fp32 path (padded batches, full logits) kept as the reference.
    fast: bool = Field(
        True, description="Packing, bf16 and a sparse loss; --no-fast: plain fp32 padded."
    )
    pack_length: int = Field(  # longer batches split into rows
        2048, gt=8, description="Longest packed row (tokens)."
    )

    # bookkeeping
    logging_steps: int = Field(5, gt=0, description="Log loss and speed every N steps.")
    eval_steps: int = Field(20, gt=0, description="Validate every N steps.")
    save_steps: int = Field(20, gt=0, description="Save a checkpoint every N steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept (plus the best).")
    # True / "auto": newest checkpoint in output; or a checkpoint dir (the flag: --resume-from)
    resume: bool | str = Field(False, description="Resume from the newest checkpoint.")
    overwrite: bool = Field(  # start afresh in an output dir that holds checkpoints
        False, description="Discard earlier checkpoints in the output dir."
    )
    strict: bool = Field(False, description="Stop at the first bad record instead of skipping it.")

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


# SimPO's own defaults (Meng et al. 2024 use beta 2-2.5 with gamma/beta 0.3-0.5); DPO's beta 0.1
# is the paper's and TRL's.
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0}


class DPOConfig(SFTConfig):
    """`loraforge dpo` (train/dpo.py): the sft fields plus the preference loss's. The data are
    chosen/rejected pairs (data/preference.py), so there is no default dataset."""

    dataset: list[str] = Field(
        default_factory=list,
        description="Preference pairs (chosen/rejected) file or dir (repeatable, comma-separated).",
    )
    output: Path = Field(
        Path("runs/dpo"), description="Output dir (adapter, checkpoints, metrics)."
    )
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate (AdamW).")
    epochs: float = Field(1, gt=0, description="Passes over the pairs (may be fractional).")
    loss: Literal["dpo", "simpo"] = Field(
        "dpo",
        description="dpo: sigmoid DPO against the base (the adapter disabled); simpo: "
        "reference-free, length-normalised (no reference forward).",
    )
    beta: float | None = Field(
        None, gt=0, description="Reward scale beta (default: 0.1 for dpo, 2.0 for simpo)."
    )
    simpo_gamma: float = Field(
        1.0, ge=0, description="SimPO's target margin gamma between the two rewards."
    )

    @model_validator(mode="after")
    def _beta(self) -> DPOConfig:
        if self.beta is None:  # recorded resolved in config.yaml
            self.beta = DEFAULT_BETA[self.loss]
        return self


class SamplingOptions(BaseModel):
    """How each answer's tokens are picked: the sampling flags of chat, infer, compare, eval and
    data distill, and the sampling fields of serve and webui, declared and validated once.

    It lives here, not in infer/sampling.py (which re-exports it), because that module imports
    torch (seconds) and the CLI must build its flags from these fields without it.
    ``to_params`` makes the engine's per-request ``SamplingParams``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(
        0.7, ge=0, allow_inf_nan=False, description="Sampling temperature; 0 means greedy."
    )
    top_p: float = Field(
        1.0,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="Nucleus sampling: keep the smallest set of tokens with this mass.",
    )
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens; 0 turns it off.")
    max_new_tokens: int = Field(256, ge=1, description="Most tokens to generate per answer.")
    repetition_penalty: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="Repetition penalty (1.0 = off)."
    )
    presence_penalty: float = Field(
        0.0,
        ge=-2,
        le=2,
        description="OpenAI's: lower the score of every token already generated by this much.",
    )
    frequency_penalty: float = Field(
        0.0,
        ge=-2,
        le=2,
        description="OpenAI's: lower a token's score by this much per time it was generated.",
    )
    min_p: float = Field(
        0.0, ge=0, le=1, description="Drop tokens below min_p x the top token's probability."
    )
    seed: int | None = Field(  # torch generators take an int64
        None, ge=-(2**63), lt=2**63, description="Sampling seed (same seed, same answer)."
    )

    def to_params(self, **extra: Any) -> SamplingParams:
        """The engine's SamplingParams; ``extra`` sets its other fields (e.g. ``stop``)."""
        from loraforge.infer.sampling import SamplingParams

        return SamplingParams(**self.model_dump(), **extra)


def parse_target_modules(text: str) -> str | list[str]:
    """``all-linear`` | ``q_proj,v_proj`` (a list of module-name suffixes) | a regex (PEFT
    full-matches a string against each module name)."""
    text = text.strip()
    if text == "all-linear" or any(c in text for c in "^$*+?()[]|\\"):
        return text
    return [s.strip() for s in text.split(",") if s.strip()]


def load_config(
    path: str | Path | None = None, *, kind: type[SFTConfig] = SFTConfig, **overrides: Any
) -> SFTConfig:
    """A ``kind`` (SFTConfig, DPOConfig) from ``path`` (YAML), then ``overrides`` that are not
    None; one-line errors."""
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
        return kind(**data)
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
