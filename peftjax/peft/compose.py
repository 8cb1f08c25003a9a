"""Composition blocks: trained runs' adapters, frozen, combined with (or without) a new one.

`config.peft.sources` lists workdirs of trained runs or HF peft adapter directories; their
adapters are loaded frozen (every parameter becomes a `FrozenAdapter`: no gradient, no optimizer
state, never checkpointed, reloaded from the sources on restore). A run source must be a
shared-mode adapter run on this run's base (same architecture and `model.hf_path` or random-init
seed), else a ValueError names it and the mismatch. Under compose="arrow" a source may also be a
`mode="per_task"` LoRA run: it counts as one frozen LoRA per task of its mixture (that task's rows
of its tables), Arrow's library of task experts. An HF peft directory (`adapter_config.json`, no
`config.json`; LoRA or DoRA) is imported onto this run's HF base (`config.model.hf_path`)
as `peftjax.interop.load_peft` does, so a MoLoRA / Arrow library can be made of LoRAs trained
with HF peft; an adapter whose shapes do not fit the base is a `PeftInteropError` naming them.

At every insertion point where a source attaches, the module becomes a composition holding its
children in order: the sources in `config.peft.sources` order, then the run's own new trainable
adapter (`config.peft.method`, if not "none") where it attaches too. A child exposes
`delta(x, ctx)`, what it adds to its site's output: `s·BA x` (LoRA), `s·U act(D h)` (bottleneck
adapters), `x (mask ⊙ φ)` (sparse). With `f` the frozen projection at a `Dense` site and the
identity at a residual `Hook` (whose output then goes `x + hook(h)` into the residual stream):

  stack     h ← h + d_1(h); h ← h + d_2(h); ...   in order: MAD-X's language adapter, then task
            adapter (AdapterHub `Stack`). Residual hooks only: at a Dense site several updates
            act on the same input, so a stack of more than one child there is refused.
  parallel  y = f(x) + Σ_i d_i(x)                 every child on the same input, updates added:
            HF peft's several active adapters. Not AdapterHub's `Parallel`, which replicates the
            batch to get one output per adapter.
  average   y = f(x) + Σ_i w_i d_i(x)             `config.peft.compose_weights` (one per child,
            default uniform) normalised to sum to 1 over the children present at the site, as
            AdapterHub's `Average` (output averaging) normalises by default; on a residual hook
            this equals its Σ_i w_i (h + d_i(h)).
  scalearn  y = f(x) + Σ_i ω_i ⊙ d_i(x)           ω trained: see `peftjax.peft.scalearn`.
  fusion    h' = h + Σ_i α_i(h) d_i(h) W_V        AdapterFusion, attention over the children's
            outputs, trained: see `peftjax.routing.fusion`.
  arrow     y = f(x) + Σ_e g_e(x) d_e(x)          zero-shot top-k routing by each LoRA's top
            singular vector, nothing trained: see `peftjax.routing.arrow`.

Sites where only the new adapter attaches are left as they are (the composition of one child is
the child), except under ScaLearn, which scales the new adapter's output too.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os

import jax
from flax import nnx

from peftjax.models.context import Context
from peftjax.models.layers import Dense, Hook
from peftjax.models.t5 import T5
from peftjax.peft.config import PeftConfig
from peftjax.peft.inject import module_paths, replace_submodule
from peftjax.peft.lora import LoRADense
from peftjax.peft.runs import check_fits, freeze, load_trained, read_config
from peftjax.peft.variables import FrozenAdapter

RULES = ("stack", "parallel", "average", "scalearn", "fusion", "molora", "arrow")
# Rules whose library is LoRA experts only, where a per-task LoRA source counts as one expert per
# task it trained on.
LORA_LIBRARY = ("arrow",)

# Rules whose site module another module builds, as "module:function". Each builder is called as
# `build(children, index, *, path, base, width, out_axis, config, num_children, num_tasks,
# tables, rngs)` (see `peftjax.peft.scalearn.scalearn_block`) and returns a `Composition`.
BLOCKS = {
    "scalearn": "peftjax.peft.scalearn:scalearn_block",
    "fusion": "peftjax.routing.fusion:fusion_block",  # AdapterFusion
    "molora": "peftjax.routing.moe:library_block",  # token top-k gate over frozen experts
    "arrow": "peftjax.routing.arrow:arrow_block",  # zero-shot routing by singular vectors
}


def block_builder(rule: str):
    module, _, name = BLOCKS[rule].partition(":")
    return getattr(importlib.import_module(module), name)


@dataclasses.dataclass
class Source:
    """A trained run's adapters: `{dotted path: module}`, every module with `delta(x, ctx)`."""

    name: str  # its workdir
    method: str
    modules: dict[str, nnx.Module]
    # A per-task run's tasks: {task name: row of its per-task tables}; empty for a shared run.
    tasks: dict[str, int] = dataclasses.field(default_factory=dict)


class Composition(nnx.Module):
    """Children `adapters` (each with `delta(x, ctx)`) combined at one insertion point.

    `base`: the frozen `Dense` at a projection site (its output is `f(x)`), None at a residual
    hook. `rule`: stack | parallel | average (a stack at a Dense site holds one child, so it is
    that child). `weights`: average's normalised weights.
    """

    def __init__(self, children: list[nnx.Module], *, rule: str, base: Dense | None = None,
                 weights: tuple[float, ...] | None = None):
        self.adapters = nnx.List(children)
        self.base = base
        self.rule = rule
        self.weights = None if weights is None else tuple(float(w) for w in weights)

    def mix(self, deltas: list[jax.Array], x: jax.Array, ctx: Context) -> jax.Array:
        """Combine the children's updates `[b, t, out]` on the same input into one."""
        del x, ctx
        if self.rule == "average":
            return sum(w * d for w, d in zip(self.weights, deltas, strict=True))
        return sum(deltas)

    def __call__(self, x_btd: jax.Array, ctx: Context) -> jax.Array:
        if self.rule == "stack" and self.base is None:
            for adapter in self.adapters:
                x_btd = x_btd + adapter.delta(x_btd, ctx)
            return x_btd
        out = x_btd if self.base is None else self.base(x_btd, ctx)
        return out + self.mix([a.delta(x_btd, ctx) for a in self.adapters], x_btd, ctx)


def load_source(workdir: str, model_config, base: str, *, load=load_trained,
                rule: str = "none") -> Source:
    """A trained run's adapters, frozen, after checking that they fit this base.

    `load(workdir, run_config) -> (experiment, model)`: `runs.load_trained`, or a shapes-only
    rebuild (`peftjax.train.accounting`, which reads no checkpoint). `rule`: the composition
    that reads it; under a `LORA_LIBRARY` rule the run must be LoRA, and may be per task (then
    `Source.tasks` lists its tasks: split it with `task_experts`). An HF peft adapter directory
    is read by `load_peft_source` instead (shapes-only when `load` is not `load_trained`)."""
    if is_peft_dir(workdir):
        return load_peft_source(workdir, model_config, base, rule=rule,
                                shapes_only=load is not load_trained)
    run_config = read_config(workdir, "sources")
    check_fits(workdir, run_config, model_config, key="sources", base=base)
    peft = run_config.peft
    fix = (f"config.peft.sources: {workdir!r} is a method={peft.method!r}, mode={peft.mode!r}, "
           f"compose={peft.get('compose', 'none')!r} run")
    if peft.method in ("none", "full"):
        raise ValueError(f"{fix}: it has no adapter to compose. Sources are adapter runs (lora, "
                         "houlsby, pfeiffer, sparse, ...); a full fine-tuning run is the first "
                         "pass of method='sparse'.")
    library = rule in LORA_LIBRARY
    _check_library_entry(fix, peft.method, peft.dora, rule)
    if peft.mode != "shared" and not library:
        raise ValueError(f"{fix}; a source must be one shared adapter. Train one run per source "
                         "task with config.peft.mode='shared' (config.data.mixture=<that task>). "
                         f"(Only compose={' / '.join(LORA_LIBRARY)} reads a per-task LoRA "
                         "run, as one expert per task.)")
    if peft.get("compose", "none") != "none":
        raise ValueError(f"{fix}; compositions do not nest: list its own sources instead.")
    exp, model = load(workdir, run_config)
    modules = _frozen_children(model, exp.adapted_paths, fix)
    tasks = {}
    if peft.mode != "shared":
        from peftjax.train.experiment import resolve_tasks  # it imports this module

        tasks = resolve_tasks(run_config)[1]  # {task: id}; per-task tables have a row per id
    return Source(workdir, peft.method, modules, tasks)


def is_peft_dir(path: str) -> bool:
    """Whether `path` is an HF peft adapter directory: adapter_config.json, no run config.json."""
    return (os.path.isfile(os.path.join(path, "adapter_config.json"))
            and not os.path.isfile(os.path.join(path, "config.json")))


def load_peft_source(adapter_dir: str, model_config, base: str, *, rule: str = "none",
                     shapes_only: bool = False) -> Source:
    """An HF peft adapter directory as a source: imported onto this run's base, frozen.

    `base`: this run's base identity (`runs.base_identity`), which must be an HF checkpoint. The
    adapter is attached to a second copy of the base (`interop.hf_peft.attach_adapter`), read
    from `base` again, or, with `shapes_only`, built from `model_config` (free under the
    accounting's `nnx.eval_shape`; the adapter itself is still read). Its modules hold that
    copy's kernels at the sites they adapt until `attach` gives every child the run's own base.
    """
    where = f"config.peft.sources: {adapter_dir}"
    if base.startswith("random init"):
        raise ValueError(f"{where} is an HF peft adapter directory, but this run's base is a "
                         f"{base}: a peft adapter source needs config.model.hf_path set to the "
                         "base it was trained on.")
    from peftjax.interop.hf_peft import PeftInteropError, attach_adapter  # it imports peftjax.peft
    from peftjax.models.hf import from_hf

    donor = (T5(model_config, rngs=nnx.Rngs(0)) if shapes_only else
             from_hf(base, dtype=model_config.dtype, param_dtype=model_config.param_dtype,
                     dropout_rate=model_config.dropout_rate))
    try:
        peft, adapted = attach_adapter(donor, adapter_dir)
    except PeftInteropError as err:
        raise PeftInteropError(f"{where}: {err}") from err
    fix = f"{where} is an HF peft {peft.method} adapter"
    if peft.method in ("poly", "mhr"):
        raise ValueError(f"{fix}, which routes tasks itself (task ids index its router), so it "
                         "is no library entry; load it alone with peftjax.interop.load_peft, or "
                         "list LoRA adapters in config.peft.sources.")
    _check_library_entry(fix, peft.method, peft.dora, rule)
    return Source(adapter_dir, peft.method, _frozen_children(donor, adapted, fix))


def _check_library_entry(fix: str, method: str, dora: bool, rule: str) -> None:
    """Under a `LORA_LIBRARY` rule, refuse anything but a plain LoRA (`fix` names the source)."""
    if rule in LORA_LIBRARY and (method != "lora" or dora):
        raise ValueError(f"{fix}{', dora=True' if dora else ''}; compose={rule!r} routes over "
                         "plain LoRA experts (method='lora', dora=False) only. List LoRA "
                         "runs or HF peft LoRA adapters (use_dora=False) in config.peft.sources, "
                         "or compose these adapters with config.peft.compose='fusion' / "
                         "'average'.")


def _frozen_children(model: nnx.Module, adapted: list[str], fix: str) -> dict[str, nnx.Module]:
    """`{path: module}` of a source's adapted modules, frozen in place; each must expose
    `delta(x, ctx)` (`fix` names the source in the error)."""
    paths = module_paths(model)
    modules = {path: paths[path] for path in adapted}
    for path, module in modules.items():
        if not callable(getattr(module, "delta", None)):
            raise ValueError(f"{fix}: its {type(module).__name__} at {path} has no "
                             "delta(x, ctx), so it cannot be composed. Compose methods that add "
                             "an update to a projection or the residual stream (lora, dora, "
                             "houlsby, pfeiffer, sparse, ...).")
        freeze(module)
    return modules


def task_experts(source: Source) -> list[Source]:
    """A per-task LoRA source as one shared, frozen LoRA source per task it trained on (in its
    mixture's order), named `"<workdir>[<task>]"`; a shared source as itself."""
    if not source.tasks:
        return [source]
    return [Source(f"{source.name}[{task}]", source.method,
                   {path: lora_task_view(module, row) for path, module in source.modules.items()})
            for task, row in source.tasks.items()]


def lora_task_view(lora: LoRADense, row: int) -> LoRADense:
    """A shared LoRA on the same frozen base holding row `row` of a per-task LoRA's factors
    (frozen), with its scale, dropout and salt."""
    if not isinstance(lora, LoRADense) or lora.lora_a.value.ndim != 3:
        raise ValueError(f"A per-task LoRA source should hold per-task LoRADense modules, got a "
                         f"{type(lora).__name__}; retrain it with config.peft.method='lora'.")
    view = LoRADense(lora.base, rank=lora.lora_a.value.shape[-1], alpha=1.0,
                     dropout_rate=lora.dropout_rate, salt=lora.salt, rngs=nnx.Rngs(0))
    for name in ("lora_a", "lora_b"):
        variable = getattr(lora, name)
        meta = dict(variable.get_metadata())
        meta["axes"] = tuple(meta.get("axes") or ())[1:]  # drop the leading `tasks` axis
        setattr(view, name, FrozenAdapter(variable.value[row], **meta))
    view.scale = lora.scale
    return view


def compose_sources(model: nnx.Module, config: PeftConfig, adapted: list[str], *, base: str,
                    num_tasks: int | None, rngs: nnx.Rngs, load=load_trained) -> list[str]:
    """Load `config.sources` and attach the composition (in place); returns all adapted paths.

    `adapted`: the paths where `apply_peft` attached the run's new adapter. `base`: this run's
    base identity (`peftjax.peft.runs.base_identity`). A no-op when `config.compose == "none"`.
    """
    if config.compose == "none":
        if config.sources:
            raise ValueError("config.peft.sources is set but config.peft.compose='none': set "
                             f"config.peft.compose to one of {RULES} (or clear the sources).")
        return adapted
    if not config.sources:
        raise ValueError(f"config.peft.compose={config.compose!r} combines trained adapters: set "
                         "config.peft.sources to their runs' workdirs, e.g. "
                         "--config.peft.sources=\"('runs/a', 'runs/b')\".")
    sources = [expert for workdir in config.sources for expert in task_experts(
        load_source(workdir, model.config, base, load=load, rule=config.compose))]
    return attach(model, config, sources, adapted, num_tasks=num_tasks, rngs=rngs)


def attach(model: nnx.Module, config: PeftConfig, sources: list[Source], adapted: list[str], *,
           num_tasks: int | None, rngs: nnx.Rngs) -> list[str]:
    """Replace every site of `sources` (and, for ScaLearn, of the new adapter) by a composition.

    Children are frozen here (again, harmlessly, for sources from `load_source`).
    """
    if config.compose not in RULES:
        raise ValueError(f"config.peft.compose must be one of {RULES} to attach sources, got "
                         f"{config.compose!r}.")
    if config.compose_weights and config.compose != "average":
        raise ValueError("config.peft.compose_weights is read by compose='average' only; clear "
                         "it or set config.peft.compose='average'.")
    paths = module_paths(model)
    new = set(adapted)
    composable = {p for p in new if callable(getattr(paths[p], "delta", None))}
    names = [s.name for s in sources] + (
        [f"the new {config.method} adapter"] if composable else [])
    weights = _average_weights(config, names) if config.compose == "average" else None
    sites = set().union(*(s.modules for s in sources))
    if config.compose == "scalearn":
        sites |= composable
    tables: dict = {}  # ScaLearn's tables shared across sites
    for path in sorted(sites):
        current = paths.get(path)
        if current is None:
            raise ValueError(f"config.peft.sources attach at {path}, which this model lacks.")
        children, index = [], []
        for i, source in enumerate(sources):
            if path in source.modules:
                children.append(freeze(source.modules[path]))
                index.append(i)
        if path in new:
            if not callable(getattr(current, "delta", None)):
                raise ValueError(
                    f"config.peft.method={config.method!r} attaches a "
                    f"{type(current).__name__} at {path}, where sources attach too, and it has "
                    "no delta(x, ctx) to compose. Choose targets away from the sources' "
                    "(config.peft.targets) or a method that adds an update (lora, houlsby, ...).")
            children.append(current)
            index.append(len(sources))
            site_base = getattr(current, "base", None)
        else:
            site_base = current
        if isinstance(site_base, Hook):
            site_base = None
        elif site_base is not None and not isinstance(site_base, Dense):
            raise ValueError(f"Cannot compose at {path}: a {type(site_base).__name__}; "
                             "compositions attach to Dense projections and residual hooks.")
        for child in children:  # one frozen base kernel for every child (no copies of W0)
            if site_base is not None and isinstance(getattr(child, "base", None), Dense):
                child.base = site_base
        if config.compose in BLOCKS:
            width, out_axis = ((model.config.d_model, "embed") if site_base is None else
                               (site_base.out_features, site_base.kernel.get_metadata()["axes"][1]))
            module = block_builder(config.compose)(
                children, index, path=path, base=site_base, width=width, out_axis=out_axis,
                config=config, num_children=len(names), num_tasks=num_tasks, tables=tables,
                rngs=rngs)
        else:
            rule = config.compose
            if rule == "stack" and site_base is not None and len(children) > 1:
                raise ValueError(
                    f"compose='stack' at {path}: {len(children)} children "
                    f"({', '.join(names[i] for i in index)}) update the same Dense projection, "
                    "which has no order to stack in. Use config.peft.compose='parallel' or "
                    "'average', or stack residual adapters (houlsby, pfeiffer).")
            site_weights = None if weights is None else _normalise([weights[i] for i in index],
                                                                   path)
            module = Composition(children, rule=rule, base=site_base, weights=site_weights)
        replace_submodule(model, path, module)
    return sorted(new | sites)


def _average_weights(config: PeftConfig, names: list[str]) -> tuple[float, ...]:
    if not config.compose_weights:
        return (1.0,) * len(names)
    if len(config.compose_weights) != len(names):
        raise ValueError(f"config.peft.compose_weights has {len(config.compose_weights)} "
                         f"weights for {len(names)} children ({', '.join(names)}): give one per "
                         "source, in order, then one for the new adapter when "
                         "config.peft.method is not 'none'.")
    return tuple(float(w) for w in config.compose_weights)


def _normalise(weights: list[float], path: str) -> tuple[float, ...]:
    total = math.fsum(weights)
    if abs(total) < 1e-12:
        raise ValueError(f"config.peft.compose_weights of the children at {path} sum to 0, so "
                         "they cannot be normalised; change the weights.")
    return tuple(w / total for w in weights)


