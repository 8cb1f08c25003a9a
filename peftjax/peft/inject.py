"""Attach PEFT modules to a base model at insertion points chosen by a regex over module paths."""

from __future__ import annotations

import dataclasses
import re

from flax import nnx

from peftjax.models.context import site_salt
from peftjax.models.layers import Dense, Hook
from peftjax.peft.bottleneck import BottleneckAdapter
from peftjax.peft.lora import LoRADense

# "full" trains every base weight (the full fine-tuning baseline); "none" trains nothing.
METHODS = ("none", "full", "lora", "houlsby", "pfeiffer")
MODES = ("shared", "per_task")
# Where each method attaches unless `targets` says otherwise (full match on dotted paths).
DEFAULT_TARGETS = {
    "lora": r".*attention\.(q|v)",  # HF peft's T5 default: q and v of every attention
    "houlsby": r".*\.(post_attention|post_ffn)",  # after attention and after the FFN
    "pfeiffer": r".*\.post_ffn",  # after the FFN only
}


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """What to attach and where. Mirrors `config.peft` (see configs/ for documented values)."""

    method: str = "lora"
    mode: str = "shared"  # one adapter for all tasks, or one per task picked by task id
    targets: str | None = None  # regex over dotted module paths; None = the method's default
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    reduction_factor: int = 16  # bottleneck width = d_model // reduction_factor
    adapter_activation: str = "relu"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Unknown config.peft.method {self.method!r}; choose from {METHODS}.")
        if self.mode not in MODES:
            raise ValueError(f"Unknown config.peft.mode {self.mode!r}; choose from {MODES}.")
        if self.method == "lora" and (not isinstance(self.rank, int) or self.rank <= 0):
            raise ValueError(f"config.peft.rank must be a positive integer, got {self.rank!r}.")
        if self.method in ("houlsby", "pfeiffer") and self.reduction_factor <= 0:
            raise ValueError("config.peft.reduction_factor must be positive, got "
                             f"{self.reduction_factor}.")

    @property
    def target_regex(self) -> str:
        return self.targets if self.targets is not None else DEFAULT_TARGETS[self.method]


def module_paths(model: nnx.Module) -> dict[str, nnx.Module]:
    """Every sub-module by dotted path, e.g. 'decoder.layers.3.cross_attention.v'."""
    return {".".join(map(str, path)): module for path, module in nnx.iter_modules(model) if path}


def apply_peft(model: nnx.Module, config: PeftConfig, *, num_tasks: int | None,
               rngs: nnx.Rngs) -> list[str]:
    """Replace matching `Dense` (LoRA) or `Hook` (bottleneck) modules in place.

    Returns the adapted paths, sorted. Raises ValueError, naming the fix, when the regex matches
    nothing this method can attach to.
    """
    if config.method in ("none", "full"):
        return []
    if config.mode == "per_task" and not num_tasks:
        raise ValueError("config.peft.mode='per_task' needs the number of tasks; it comes from "
                         "the data (or set config.peft.num_tasks).")
    tasks = num_tasks if config.mode == "per_task" else None
    kind = Dense if config.method == "lora" else Hook
    try:
        pattern = re.compile(config.target_regex)
    except re.error as e:
        raise ValueError(f"config.peft.targets={config.target_regex!r} is not a valid regex: "
                         f"{e}") from e
    candidates = {p: m for p, m in module_paths(model).items() if isinstance(m, kind)}
    matched = sorted(p for p in candidates if pattern.fullmatch(p))
    if not matched:
        examples = ", ".join(sorted(candidates)[:6])
        raise ValueError(
            f"config.peft.targets={config.target_regex!r} matches no module that "
            f"{config.method!r} attaches to ({kind.__name__} modules, full match on the dotted "
            f"path). Such paths look like: {examples}, ... e.g. r'.*attention\\.(q|v)'.")
    d_model = getattr(getattr(model, "config", None), "d_model", None)
    for path in matched:
        parent_path, _, name = path.rpartition(".")
        parent = _get(model, parent_path)
        base = getattr(parent, name)
        if config.method == "lora":
            new = LoRADense(base, rank=config.rank, alpha=config.alpha,
                            dropout_rate=config.dropout, num_tasks=tasks, rslora=config.rslora,
                            salt=site_salt(path), rngs=rngs)
        else:
            new = BottleneckAdapter(d_model, d_model // config.reduction_factor,
                                    activation=config.adapter_activation, num_tasks=tasks,
                                    rngs=rngs)
        setattr(parent, name, new)
    return matched


def _get(model: nnx.Module, dotted: str) -> nnx.Module:
    node = model
    for part in dotted.split(".") if dotted else []:
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node
