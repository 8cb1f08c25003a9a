"""The PEFT methods, and what each needs from an insertion point.

Each method lives in its own module, which defines `SPECS: dict[str, MethodSpec]`. Modules are
imported on first use, so adding a method means adding one module and one line to `METHODS`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from flax import nnx

from peftjax.models.config import T5Config
from peftjax.peft.config import PeftConfig

# method name -> module that defines it. "full" and "none" are baselines with no module.
METHODS: dict[str, str | None] = {
    "none": None,
    "full": None,
    "lora": "peftjax.peft.lora",
    "houlsby": "peftjax.peft.bottleneck",
    "pfeiffer": "peftjax.peft.bottleneck",
    "parallel": "peftjax.peft.bottleneck",
    "compacter": "peftjax.peft.phm",
    "compacter_pp": "peftjax.peft.phm",
    "phm": "peftjax.peft.phm",
    "ia3": "peftjax.peft.ia3",
    "prompt_tuning": "peftjax.peft.prompt",
    "prefix_tuning": "peftjax.peft.prefix",
    "ln_tuning": "peftjax.peft.norm_tuning",
    "road": "peftjax.peft.road",
    "sparse": "peftjax.peft.sparse",
    "poly": "peftjax.routing.poly",
    "mhr": "peftjax.routing.poly",
    "molora": "peftjax.routing.moe",
    "smora": "peftjax.routing.moe",
    "hyperformer": "peftjax.hyper.methods",
    "hyperformer_pp": "peftjax.hyper.methods",
    "text_to_lora": "peftjax.hyper.methods",
}


@dataclasses.dataclass
class Site:
    """Everything a method's `build` may need about the place it attaches to.

    `shared` is one dict per `apply_peft` call, for parameters shared by every site (e.g. the
    Compacter Kronecker rules): the first site creates them, later sites reuse the same objects.
    """

    path: str  # dotted module path, e.g. "encoder.layers.0.self_attention.q"
    num_tasks: int | None  # leading `tasks` axis size for per_task mode; None = shared
    model_config: T5Config
    rngs: nnx.Rngs
    shared: dict[str, Any]
    model: nnx.Module  # the whole model, read-only (e.g. prompt init from token embeddings)
    num_task_ids: int | None = None  # rows of task-routed tables (poly, mhr) in any mode
    conditioning: Any = None  # what a hypernetwork conditions on (peftjax.hyper.ConditionData)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """How a method attaches.

    Attributes:
      kinds: the module classes it replaces (a matched module of another class is an error).
      targets: default regex (full match on dotted paths) when `config.peft.targets` is unset.
      build: `(matched_module, site, config) -> replacement module`.
      where: human description of valid insertion points, for error messages.
      packing: False if the method cannot run on packed rows (the run must set pack=False).
      finish: `(model, site, config) -> None`, called once after every site is built, with the
        last site (its `shared` dict holds what the builds recorded): methods whose parameters
        live above the sites (a hypernetwork that generates every site's weights) attach them here.
    """

    kinds: tuple[type, ...]
    targets: str
    build: Callable[[nnx.Module, Site, PeftConfig], nnx.Module]
    where: str
    packing: bool = True
    finish: Callable[[nnx.Module, Site, PeftConfig], None] | None = None


def method_spec(method: str) -> MethodSpec:
    module = METHODS.get(method)
    if module is None:
        raise ValueError(f"config.peft.method={method!r} attaches no modules.")
    return importlib.import_module(module).SPECS[method]
