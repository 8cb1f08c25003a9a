"""Everything a run needs, built from a config: data names, base model, PEFT, mesh, split state."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from ml_collections import ConfigDict

from peftjax import data
from peftjax.config import ConfigError, validate
from peftjax.models import T5, T5Config, from_hf, preset
from peftjax.models.hf import load_hf_config
from peftjax.peft import METHODS, PeftConfig, apply_peft, method_spec, trainable_filter
from peftjax.peft.compose import compose_sources
from peftjax.peft.runs import base_identity
from peftjax.sharding import batch_sharding, make_mesh, state_shardings


@dataclasses.dataclass
class Experiment:
    """A built run. `trainable` / `frozen` are placed on `mesh` by the logical-axis rules."""

    config: ConfigDict
    model_config: T5Config
    peft_config: PeftConfig
    task_names: list[str]
    task_ids: dict[str, int]
    num_task_ids: int
    mesh: Mesh
    graphdef: nnx.GraphDef
    trainable: nnx.State
    frozen: nnx.State
    adapted_paths: list[str]

    @functools.cached_property
    def batch_sharding(self) -> NamedSharding:
        """How `[batch, length]` inputs split over the mesh."""
        return batch_sharding(self.mesh, self.config.mesh.rules)

    @property
    def packed(self) -> bool:
        return bool(self.config.data.pack)

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must agree with to be resumed by this run."""
        shapes = {"/".join(map(str, k)): list(v.value.shape)
                  for k, v in nnx.to_flat_state(self.trainable)}
        return {
            "model": dataclasses.asdict(self.model_config),
            "base": self.config.model.hf_path or f"random init, seed {self.config.seed}",
            "peft": dataclasses.asdict(self.peft_config),
            "trainable_shapes": shapes,
        }

    def parameter_counts(self) -> dict[str, Any]:
        """total, trainable, per task, by site, ...: see `peftjax.train.accounting.summarize`
        (the same numbers `peftjax params` computes from shapes alone)."""
        from peftjax.train.accounting import summarize  # it imports this module

        return summarize(self.trainable, self.frozen, peft_config=self.peft_config,
                         num_tasks=len(self.task_names), adapted_paths=self.adapted_paths)

    def names_by_id(self) -> dict[int, str]:
        return {i: n for n, i in self.task_ids.items()}


def model_config_from(config: ConfigDict) -> T5Config:
    overrides = dict(dropout_rate=config.model.dropout_rate, dtype=config.model.dtype)
    if config.model.vocab_size:
        overrides["vocab_size"] = config.model.vocab_size
    if config.model.hf_path:
        return load_hf_config(config.model.hf_path, **overrides)
    return preset(config.model.size, **overrides)


def build_base_model(config: ConfigDict) -> T5:
    """The frozen base: from `config.model.hf_path`, or a seeded random init of `size`."""
    if config.model.hf_path:
        return from_hf(config.model.hf_path, dropout_rate=config.model.dropout_rate,
                       dtype=config.model.dtype)
    return T5(model_config_from(config), rngs=nnx.Rngs(config.seed))


def peft_config_from(config: ConfigDict) -> PeftConfig:
    fields = {f.name: config.peft[f.name] for f in dataclasses.fields(PeftConfig)}
    fields["targets"] = fields["targets"] or None
    for name in ("sources", "compose_weights"):  # hashable, and JSON lists come back as tuples
        fields[name] = tuple(fields[name])
    return PeftConfig(**fields)


def resolve_tasks(config: ConfigDict) -> tuple[list[str], dict[str, int]]:
    data.import_task_modules(list(config.data.task_modules))
    names = data.task_names(config.data.mixture)
    return names, {name: data.task_id_of(name) for name in names}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a config resolves to before anything is allocated (shared by `build` and the
    shape-only parameter accounting of `peftjax.train.accounting`)."""

    peft_config: PeftConfig
    model_config: T5Config
    task_names: list[str]
    task_ids: dict[str, int]
    num_task_ids: int
    num_tasks: int  # rows of the per-task tables (used in mode="per_task")


def plan(config: ConfigDict) -> Plan:
    """Validate the config and resolve method, tasks and model shape; reads no weights."""
    validate(config)
    peft_config = peft_config_from(config)  # validates method / mode / rank first
    if config.data.pack and METHODS[peft_config.method] \
            and not method_spec(peft_config.method).packing:
        raise ConfigError(f"config.peft.method={peft_config.method!r} needs one example per row; "
                          "set config.data.pack=False.")
    if peft_config.method == "sparse" and not peft_config.sparse_mask_from:
        from peftjax.peft.sparse import FIRST_PASS_HELP
        raise ConfigError(FIRST_PASS_HELP)
    task_names, task_ids = resolve_tasks(config)
    num_task_ids = max(task_ids.values()) + 1
    num_tasks = config.peft.num_tasks or num_task_ids
    if num_tasks < num_task_ids:
        raise ConfigError(f"config.peft.num_tasks={num_tasks} but the mixture "
                          f"{config.data.mixture!r} has task ids up to {num_task_ids - 1}; set "
                          f"it to at least {num_task_ids} (or 0 to derive it).")
    model_config = model_config_from(config)
    vocab_size = data.vocabulary(config.data.mixture).vocab_size
    if model_config.vocab_size < vocab_size:
        raise ConfigError(f"The model's vocabulary ({model_config.vocab_size}) is smaller than "
                          f"the data's ({vocab_size}); set config.model.vocab_size >= "
                          f"{vocab_size}.")
    return Plan(peft_config, model_config, task_names, task_ids, num_task_ids, num_tasks)


def build(config: ConfigDict, *, with_peft: bool = True) -> Experiment:
    """Validate the config and build the run (nothing is written anywhere)."""
    resolved = plan(config)
    peft_config, num_tasks = resolved.peft_config, resolved.num_tasks
    mesh = make_mesh(config.mesh.shape)
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"] * jax.process_count()
    for key in ("batch_size", "eval_batch_size"):
        if config.data[key] % data_parallel:
            raise ConfigError(f"config.data.{key}={config.data[key]} does not split evenly over "
                              f"{data_parallel} data-parallel shards (mesh data x fsdp x "
                              f"processes); use a multiple of {data_parallel}.")
    model = build_base_model(config)
    adapted = []
    if with_peft:
        adapted = apply_peft(model, peft_config, num_tasks=num_tasks,
                             rngs=nnx.Rngs(config.seed + 1))
        # Frozen adapters of trained runs (config.peft.sources) combined with the new one.
        adapted = compose_sources(model, peft_config, adapted, base=base_identity(config),
                                  num_tasks=num_tasks, rngs=nnx.Rngs(config.seed + 2))
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(peft_config.method), ...)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    trainable = jax.device_put(trainable, state_shardings(trainable, rules, mesh))
    frozen = jax.device_put(frozen, state_shardings(frozen, rules, mesh))
    return Experiment(config, model.config, peft_config, resolved.task_names, resolved.task_ids,
                      resolved.num_task_ids, mesh, graphdef, trainable, frozen, adapted)
