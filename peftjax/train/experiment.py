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
from peftjax.hyper import HYPER_METHODS, ConditionData, embed_descriptions
from peftjax.hyper.condition import description_tokens
from peftjax.models import T5, T5Config, from_hf, preset
from peftjax.models.config import REMAT_POLICIES
from peftjax.models.hf import load_hf_config
from peftjax.peft import METHODS, PeftConfig, apply_peft, method_spec, trainable_filter
from peftjax.peft.compose import compose_sources
from peftjax.peft.runs import base_identity
from peftjax.peft.variables import as_masters
from peftjax.sharding import batch_sharding, mesh_from_config, state_shardings

_EXECUTION_FIELDS = ("scan_layers", "remat")  # T5Config fields outside the fingerprint


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
    heldout_names: list[str] = dataclasses.field(default_factory=list)

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
        # How the layers run (scanned, rematerialised) changes no parameter: a run may resume or
        # be evaluated with other settings.
        model = {k: v for k, v in dataclasses.asdict(self.model_config).items()
                 if k not in _EXECUTION_FIELDS}
        return {
            "model": model,
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
    overrides = dict(dropout_rate=config.model.dropout_rate, dtype=config.model.dtype,
                     param_dtype=config.model.param_dtype, **_execution(config))
    if config.model.vocab_size:
        overrides["vocab_size"] = config.model.vocab_size
    if config.model.hf_path:
        return load_hf_config(config.model.hf_path, **overrides)
    return preset(config.model.size, **overrides)


def _execution(config: ConfigDict) -> dict[str, Any]:
    """How the layer stacks run (`T5Config.scan_layers`, `remat`): no weight depends on them."""
    if config.model.remat not in REMAT_POLICIES:
        raise ConfigError(f"config.model.remat={config.model.remat!r} is not a remat policy; "
                          f"choose one of {REMAT_POLICIES}.")
    return dict(scan_layers=config.model.scan_layers, remat=config.model.remat)


def build_base_model(config: ConfigDict) -> T5:
    """The frozen base: from `config.model.hf_path`, or a seeded random init of `size`."""
    if config.model.hf_path:
        return from_hf(config.model.hf_path, dropout_rate=config.model.dropout_rate,
                       dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                       **_execution(config))
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


def resolve_heldout(config: ConfigDict, trained: list[str]) -> tuple[list[str], dict[str, int]]:
    """The held-out tasks (`config.data.heldout`, evaluated zero-shot) and their ids."""
    if not config.data.heldout:
        return [], {}
    names = data.task_names(config.data.heldout)
    overlap = sorted(set(names) & set(trained))
    if overlap:
        raise ConfigError(f"config.data.heldout={config.data.heldout!r} has tasks the run trains "
                          f"on ({overlap[:3]}); held-out tasks must be new: remove them from one "
                          "of config.data.mixture / config.data.heldout.")
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
    heldout_names: tuple[str, ...] = ()  # tasks evaluated zero-shot (config.data.heldout)
    num_languages: int = 1  # rows of a language table (largest language id + 1)


def plan(config: ConfigDict) -> Plan:
    """Validate the config and resolve method, tasks and model shape; reads no weights."""
    validate(config)
    peft_config = peft_config_from(config)  # validates method / mode / rank first
    _check_precision(config, peft_config.method)
    if config.data.pack and METHODS[peft_config.method] \
            and not method_spec(peft_config.method).packing:
        raise ConfigError(f"config.peft.method={peft_config.method!r} needs one example per row; "
                          "set config.data.pack=False.")
    if peft_config.method == "sparse" and not peft_config.sparse_mask_from:
        from peftjax.peft.sparse import FIRST_PASS_HELP
        raise ConfigError(FIRST_PASS_HELP)
    task_names, task_ids = resolve_tasks(config)
    heldout_names, heldout_ids = resolve_heldout(config, task_names)
    num_task_ids = max({**task_ids, **heldout_ids}.values()) + 1
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
    num_languages = _num_languages(config, [*task_names, *heldout_names])
    if peft_config.method in HYPER_METHODS:
        _check_hyper(config, peft_config, [*task_names, *heldout_names])
    return Plan(peft_config, model_config, task_names, task_ids, num_task_ids, num_tasks,
                tuple(heldout_names), num_languages)


DTYPES = ("float32", "bfloat16")


def _check_precision(config: ConfigDict, method: str) -> None:
    """Compute and base-storage dtypes are float32 / bfloat16; a trained base (method=full)
    keeps float32 masters: an optimizer update below bfloat16's resolution (2^-8 relative)
    would round away, so a bfloat16 base is refused rather than silently upcast."""
    for key in ("dtype", "param_dtype"):
        if config.model[key] not in DTYPES:
            raise ConfigError(f"config.model.{key}={config.model[key]!r} is not one of {DTYPES}.")
    if method == "full" and config.model.param_dtype != "float32":
        raise ConfigError(
            f"config.peft.method='full' trains the base weights, whose master copies must be "
            f"float32, but config.model.param_dtype={config.model.param_dtype!r} stores the base "
            "in that dtype. Set config.model.param_dtype='float32' (compute can still be "
            "bfloat16: config.model.dtype='bfloat16'), or train a PEFT method.")


def check_grad_accum(config: ConfigDict, data_parallel: int) -> None:
    """Every micro-batch of a step keeps every data-parallel shard's share of the batch."""
    k = config.train.grad_accum_steps
    if k < 1:
        raise ConfigError(f"config.train.grad_accum_steps={k} must be at least 1 (1 = no "
                          "gradient accumulation).")
    if config.data.batch_size % (k * data_parallel):
        raise ConfigError(
            f"config.data.batch_size={config.data.batch_size} does not split into "
            f"config.train.grad_accum_steps={k} micro-batches over {data_parallel} "
            f"data-parallel shards (mesh data x fsdp): it must be a multiple of "
            f"{k} x {data_parallel} = {k * data_parallel}. Change config.data.batch_size or "
            "config.train.grad_accum_steps.")


def _num_languages(config: ConfigDict, names: list[str]) -> int:
    found = max(data.language_id_of(name) for name in names) + 1
    wanted = config.peft.num_languages or found
    if wanted < found:
        raise ConfigError(f"config.peft.num_languages={wanted} but the data has language ids up "
                          f"to {found - 1}; set it to at least {found} (or 0 to derive it).")
    return wanted


def _check_hyper(config: ConfigDict, peft_config: PeftConfig, names: list[str]) -> None:
    if peft_config.hyper_generate == "per_example" and config.data.pack:
        raise ConfigError("config.peft.hyper_generate='per_example' generates one adapter per "
                          "example, which needs one example per row: set config.data.pack=False "
                          "(or generate per task: hyper_generate='per_task').")
    if peft_config.hyper_condition == "description":
        missing = data.missing_descriptions(names)
        if missing:
            raise ConfigError(
                f"config.peft.hyper_condition='description' generates adapters from task "
                f"descriptions, but {len(missing)} task(s) of config.data.mixture / "
                f"config.data.heldout have none (e.g. {missing[0]!r}). Register one with "
                "peftjax.data.register_description(task, text) where the task is registered, "
                "or condition on the task id (config.peft.hyper_condition='task').")


def condition_data(config: ConfigDict, resolved: Plan, base: T5) -> ConditionData | None:
    """What a hypernetwork conditions on, for `apply_peft` (None for other methods): table sizes,
    and for description conditioning the frozen `base`'s embeddings of every task's
    description (tokenised whole with the mixture's vocabulary: cut descriptions that share a
    prefix would collapse into one task)."""
    peft_config = resolved.peft_config
    if peft_config.method not in HYPER_METHODS:
        return None
    descriptions = None
    if peft_config.hyper_condition == "description":
        names = [*resolved.task_names, *resolved.heldout_names]
        texts = {data.task_id_of(name): data.description_of(name) for name in names}
        vocab = data.vocabulary(config.data.mixture)
        length = max(len(vocab.encode(text)) for text in texts.values()) + 1  # + EOS
        tokens = description_tokens(texts, resolved.num_task_ids, vocab.encode, length)
        descriptions = embed_descriptions(base, tokens)
    return ConditionData(resolved.num_task_ids, resolved.num_languages, descriptions)


def build(config: ConfigDict, *, with_peft: bool = True) -> Experiment:
    """Validate the config and build the run (nothing is written anywhere)."""
    resolved = plan(config)
    peft_config, num_tasks = resolved.peft_config, resolved.num_tasks
    mesh = mesh_from_config(config)  # config.mesh.preset or .shape; batch sizes must split
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]  # the mesh spans every process
    check_grad_accum(config, data_parallel)
    model = build_base_model(config)
    adapted = []
    if with_peft:
        adapted = apply_peft(model, peft_config, num_tasks=num_tasks,
                             rngs=nnx.Rngs(config.seed + 1),
                             conditioning=condition_data(config, resolved, model))
        # Frozen adapters of trained runs (config.peft.sources) combined with the new one.
        adapted = compose_sources(model, peft_config, adapted, base=base_identity(config),
                                  num_tasks=num_tasks, rngs=nnx.Rngs(config.seed + 2))
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(peft_config.method), ...)
    trainable = as_masters(trainable)  # float32 masters whatever config.model.dtype
    rules = tuple(tuple(r) for r in config.mesh.rules)
    trainable = jax.device_put(trainable, state_shardings(trainable, rules, mesh))
    frozen = jax.device_put(frozen, state_shardings(frozen, rules, mesh))
    return Experiment(config, model.config, peft_config, resolved.task_names, resolved.task_ids,
                      resolved.num_task_ids, mesh, graphdef, trainable, frozen, adapted,
                      list(resolved.heldout_names))
