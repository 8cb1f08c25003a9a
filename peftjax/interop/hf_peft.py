"""Hugging Face peft adapter directories ⇄ peftjax models (T5).

An HF peft adapter directory holds `adapter_config.json` and `adapter_model.safetensors`, with
tensors named after the base model's torch modules, e.g.
`base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight` `[r, in]`.

* `load_peft(base_hf_dir, adapter_dir)`: the HF T5 base (`from_hf`) with the adapter attached by
  `apply_peft` and its weights copied in. A dict `{task name: adapter dir}` gives one per-task
  model (task id = order in the dict), e.g. a library of LoRAs trained separately.
* `save_peft(model, out_dir)`: the inverse, loadable by `peft.PeftModel.from_pretrained`.

Supported: LoRA (rsLoRA, DoRA, any Linear targets, rank/alpha patterns), (IA)^3 and prompt tuning;
`load_peft` also reads Poly / MHR (peft's POLY: the model then takes `task_ids=` < n_tasks).
Per-module ranks and scales that differ from the model-wide ones are made exact by zero-padding
the rank and folding the scale ratio into B (`s·B A` is all that reaches the output).
This module needs neither torch nor peft.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from peftjax.models.config import T5Config
from peftjax.models.hf import _hf_key_map, from_hf
from peftjax.models.t5 import T5
from peftjax.peft import PeftConfig, PeftParam, apply_peft, module_paths
from peftjax.peft.variables import FrozenAdapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # what peft prepends to the base model's module names
PEFT_TYPES = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt_tuning", "POLY": "poly"}
SEQ2SEQ = "SEQ_2_SEQ_LM"
# LoRA options that change the forward pass in ways peftjax's LoRADense does not implement:
# (key, the value that is fine).
_LORA_UNSUPPORTED = (("fan_in_fan_out", False), ("lora_bias", False), ("use_qalora", False),
                     ("layer_replication", None), ("alora_invocation_tokens", None),
                     ("arrow_config", None), ("modules_to_save", None),
                     ("trainable_token_indices", None), ("target_parameters", None),
                     ("use_bdlora", None))
_IA3_UNSUPPORTED = (("fan_in_fan_out", False), ("modules_to_save", None))
_POLY_UNSUPPORTED = (("poly_type", "poly"), ("modules_to_save", None))


class PeftInteropError(ValueError):
    """An adapter that cannot be loaded or saved as asked; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class HFAdapter:
    """One HF peft adapter directory, read: its config and its tensors (float32 numpy)."""

    path: str
    config: dict
    tensors: dict[str, np.ndarray]

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", ""))


@dataclasses.dataclass
class Imported:
    """An adapter translated to peftjax: what to build and what to copy in.

    `weights[path][attr]` is the value of variable `attr` of the module at dotted `path`, in
    peftjax's layout, for a shared model. `lora_scale[path]` is the scale `weights` assume.
    """

    config: dict  # PeftConfig fields
    weights: dict[str, dict[str, np.ndarray]]
    lora_scale: dict[str, float] = dataclasses.field(default_factory=dict)
    num_task_ids: int | None = None  # rows of a task-routed table (Poly's n_tasks)


# --------------------------------------------------------------------------- names


def hf_module_names(cfg: T5Config) -> dict[str, str]:
    """peftjax dotted path of every projection → the HF torch module name.

    e.g. `decoder.layers.0.cross_attention.q` → `decoder.block.0.layer.1.EncDecAttention.q`;
    derived from the same table that loads base checkpoints (`peftjax.models.hf`).
    """
    names = {}
    for ours, hf_name, _ in _hf_key_map(cfg):
        if ours[-1] == "kernel":
            names[".".join(map(str, ours[:-1]))] = hf_name.removesuffix(".weight")
    return names


def _leaf(hf_name: str) -> str:
    return hf_name.rsplit(".", 1)[-1]


def _paths_regex(paths: list[str], candidates: list[str]) -> str:
    """A regex whose full matches among `candidates` are exactly `paths`: a short one if the
    leaf names (`q`, `wo`, ...) select them, else the explicit alternation."""
    wanted = set(paths)
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    short = r".*\.(" + "|".join(map(re.escape, leaves)) + ")"
    if {c for c in candidates if re.fullmatch(short, c)} == wanted:
        return short
    return "(" + "|".join(map(re.escape, sorted(paths))) + ")"


# --------------------------------------------------------------------------- reading


def read_adapter(path: str) -> HFAdapter:
    """Read `path/adapter_config.json` and `path/adapter_model.safetensors`."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise PeftInteropError(f"Adapter directory {path!r} does not exist; pass a directory "
                               "written by peft's save_pretrained() (adapter_config.json + "
                               "adapter_model.safetensors).")
    config_file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_file):
        raise PeftInteropError(f"{path!r} has no {CONFIG_FILE}; pass a directory written by "
                               "peft's save_pretrained().")
    weights_file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights_file):
        hint = (" It has adapter_model.bin: load it with peft and save_pretrained(..., "
                "safe_serialization=True) to convert it." if
                os.path.isfile(os.path.join(path, "adapter_model.bin")) else "")
        raise PeftInteropError(f"{path!r} has no {WEIGHTS_FILE}.{hint}")
    with open(config_file) as f:
        config = json.load(f)
    tensors = {}
    with safe_open(weights_file, framework="flax") as f:  # flax reads bfloat16 too
        for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            tensors[name] = np.asarray(f.get_tensor(name), dtype=np.float32)
    return HFAdapter(path, config, tensors)


def _check_options(adapter: HFAdapter, unsupported: tuple[tuple[str, object], ...]) -> None:
    for key, fine in unsupported:
        value = adapter.config.get(key, fine)
        if value not in (fine, None, False, [], {}):
            raise PeftInteropError(
                f"{adapter.path!r}: adapter_config.json sets {key}={value!r}, which peftjax "
                f"cannot express; re-train the adapter without {key}.")


def _module_tensors(adapter: HFAdapter, suffixes: tuple[str, ...],
                    optional: tuple[str, ...] = ()) -> dict[str, dict[str, np.ndarray]]:
    """`{hf module name: {suffix: tensor}}`; any other tensor is an error naming it."""
    by_module: dict[str, dict[str, np.ndarray]] = {}
    for key, value in adapter.tensors.items():
        name = key.removeprefix(PREFIX)
        for suffix in (*suffixes, *optional):
            if name.endswith("." + suffix):
                by_module.setdefault(name[:-len(suffix) - 1], {})[suffix] = value
                break
        else:
            raise PeftInteropError(
                f"{adapter.path!r}: tensor {key!r} is not part of a {adapter.peft_type} adapter "
                f"peftjax can express (expected names ending in {suffixes + optional}); "
                "re-train without extra trainable modules (modules_to_save, bias, ...).")
    for module, parts in by_module.items():
        missing = [s for s in suffixes if s not in parts]
        if missing:
            raise PeftInteropError(f"{adapter.path!r}: module {module!r} lacks {missing}; the "
                                   "adapter file is incomplete.")
    if not by_module:
        raise PeftInteropError(f"{adapter.path!r}: {WEIGHTS_FILE} holds no "
                               f"{adapter.peft_type} weights.")
    return by_module


def _resolve_modules(adapter: HFAdapter, hf_names: list[str],
                     model: T5) -> dict[str, tuple[str, nnx.Module]]:
    """HF module name → (peftjax path, the base `Dense` there); clear errors for the rest."""
    ours_by_hf = {hf: ours for ours, hf in hf_module_names(model.config).items()}
    modules = module_paths(model)
    resolved = {}
    for name in hf_names:
        if name not in ours_by_hf:
            what = ("the tied output head (this base ties lm_head to the embeddings; peftjax "
                    "adapts only an untied lm_head)" if name == "lm_head" else
                    "not a projection of this base (embeddings, norms and layers beyond the "
                    "base's depth cannot be adapted)")
            raise PeftInteropError(f"{adapter.path!r} adapts {name!r}, which is {what}. Is it "
                                   "an adapter for another base model? "
                                   f"{_base_hint(adapter)}")
        resolved[name] = (ours_by_hf[name], modules[ours_by_hf[name]])
    return resolved


def _base_hint(adapter: HFAdapter) -> str:
    base = adapter.config.get("base_model_name_or_path")
    return (f"adapter_config.json says it was made for {base!r}; load it on that base."
            if base else "Load it on the base model it was trained on.")


def _check_shape(adapter: HFAdapter, key: str, module: str, got: tuple, want: tuple) -> None:
    if tuple(got) != tuple(want):
        raise PeftInteropError(
            f"{adapter.path!r}: {key} of {module!r} has shape {tuple(got)} but this base needs "
            f"{tuple(want)}: the adapter was made for another base model. {_base_hint(adapter)}")


# --------------------------------------------------------------------------- import per method


def _pattern_value(patterns: Mapping[str, object], hf_name: str, default):
    """peft's rank/alpha pattern lookup: first key `k` with `(.*\\.)?(k)$` matching the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", hf_name):
            return value
    return default


def _lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if rslora else rank)


def _import_lora(adapter: HFAdapter, model: T5) -> Imported:
    cfg = adapter.config
    _check_options(adapter, _LORA_UNSUPPORTED)
    embedded = sorted(k.removeprefix(PREFIX).rsplit(".", 1)[0] for k in adapter.tensors
                      if k.endswith(".lora_embedding_A"))
    if embedded:
        raise PeftInteropError(
            f"{adapter.path!r} adapts the embedding table {embedded[0]!r} (LoRA on an "
            "Embedding), which peftjax cannot express: it adapts projections (q, k, v, o, "
            "wi_0, wi_1, wo, lm_head). Re-train without it in target_modules.")
    dora = bool(cfg.get("use_dora", False))
    magnitude = ("lora_magnitude_vector", "lora_magnitude_vector.weight")
    by_module = _module_tensors(adapter, ("lora_A.weight", "lora_B.weight"),
                                optional=magnitude if dora else ())
    resolved = _resolve_modules(adapter, sorted(by_module), model)
    rslora = bool(cfg.get("use_rslora", False))
    alpha = float(cfg.get("lora_alpha", 8))
    if alpha <= 0:
        raise PeftInteropError(f"{adapter.path!r}: lora_alpha={alpha} leaves the adapter "
                               "without effect; peftjax needs a positive alpha.")
    ranks = {name: parts["lora_A.weight"].shape[0] for name, parts in by_module.items()}
    rank = max(ranks.values())
    weights, scales = {}, {}
    for name, (path, dense) in resolved.items():
        parts, r = by_module[name], ranks[name]
        _check_shape(adapter, "lora_A.weight", name, parts["lora_A.weight"].shape,
                     (r, dense.in_features))
        _check_shape(adapter, "lora_B.weight", name, parts["lora_B.weight"].shape,
                     (dense.out_features, r))
        # Zero-padding the rank is exact: the extra rows of A meet zero columns of B.
        a_ir = np.zeros((dense.in_features, rank), np.float32)
        b_ro = np.zeros((rank, dense.out_features), np.float32)
        a_ir[:, :r], b_ro[:r] = parts["lora_A.weight"].T, parts["lora_B.weight"].T
        weights[path] = {"lora_a": a_ir, "lora_b": b_ro}
        module_alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, name, alpha))
        scales[path] = _lora_scale(module_alpha, r, rslora)
        if dora:
            found = [parts[m] for m in magnitude if m in parts]
            if not found:
                raise PeftInteropError(f"{adapter.path!r}: use_dora is set but {name!r} has no "
                                       "lora_magnitude_vector; the adapter file is incomplete.")
            _check_shape(adapter, "lora_magnitude_vector", name, found[0].shape,
                         (dense.out_features,))
            weights[path]["lora_magnitude"] = found[0]
    config = dict(method="lora", rank=rank, alpha=alpha, rslora=rslora, dora=dora,
                  dropout=float(cfg.get("lora_dropout", 0.0)))
    return Imported(config, weights, scales)


def _import_ia3(adapter: HFAdapter, model: T5) -> Imported:
    _check_options(adapter, _IA3_UNSUPPORTED)
    by_module = _module_tensors(adapter, ("ia3_l",))
    resolved = _resolve_modules(adapter, sorted(by_module), model)
    weights, feedforward = {}, []
    for name, (path, dense) in resolved.items():
        value = by_module[name]["ia3_l"]
        # peft stores [1, in] for feed-forward modules (input scaled), else [out, 1].
        is_ff = value.ndim == 2 and value.shape[0] == 1 and value.shape[1] != 1
        want = (1, dense.in_features) if is_ff else (dense.out_features, 1)
        _check_shape(adapter, "ia3_l", name, value.shape, want)
        weights[path] = {"ia3_l": value.reshape(-1)}
        if is_ff:
            feedforward.append(path)
    ff_regex = (_paths_regex(feedforward, sorted(hf_module_names(model.config)))
                if feedforward else "(?!)")  # matches nothing
    return Imported(dict(method="ia3", ia3_feedforward=ff_regex), weights)


def _import_prompt(adapter: HFAdapter, model: T5) -> Imported:
    cfg = adapter.config
    if cfg.get("task_type") != SEQ2SEQ:
        raise PeftInteropError(
            f"{adapter.path!r}: prompt tuning with task_type={cfg.get('task_type')!r}; peftjax "
            f"prompts the encoder of a seq2seq model as peft's task_type={SEQ2SEQ!r} does. "
            "Re-train with task_type='SEQ_2_SEQ_LM'.")
    if set(adapter.tensors) != {"prompt_embeddings"}:
        raise PeftInteropError(f"{adapter.path!r}: expected one tensor 'prompt_embeddings', found "
                               f"{sorted(adapter.tensors)}.")
    table = adapter.tensors["prompt_embeddings"]
    p = int(cfg.get("num_virtual_tokens", 0))
    subs = int(cfg.get("num_transformer_submodules") or 2)
    _check_shape(adapter, "prompt_embeddings", "prompt encoder", table.shape,
                 (subs * p, model.config.d_model))
    # For seq2seq peft prepends only the first p rows (to the encoder input); the rest are unused.
    return Imported(dict(method="prompt_tuning", num_virtual_tokens=p, prompt_init="random"),
                    {"encoder.prompt": {"prompt": table[:p]}})


def _import_poly(adapter: HFAdapter, model: T5) -> Imported:
    cfg = adapter.config
    _check_options(adapter, _POLY_UNSUPPORTED)
    sizes = {key: int(cfg.get(key) or 0) for key in ("r", "n_tasks", "n_skills", "n_splits")}
    if min(sizes.values()) <= 0:
        raise PeftInteropError(f"{adapter.path!r}: adapter_config.json needs positive r, n_tasks, "
                               f"n_skills and n_splits, got {sizes}.")
    r, tasks, skills, splits = sizes.values()
    by_module = _module_tensors(adapter, ("poly_lora_A", "poly_lora_B",
                                          "poly_router.module_logits"))
    resolved = _resolve_modules(adapter, sorted(by_module), model)
    weights = {}
    for name, (path, dense) in resolved.items():
        parts = by_module[name]
        if dense.in_features % splits or dense.out_features % splits:
            raise PeftInteropError(f"{adapter.path!r}: n_splits={splits} does not divide the "
                                   f"widths of {name!r} ({dense.in_features} -> "
                                   f"{dense.out_features}). {_base_hint(adapter)}")
        # Same layouts as peftjax's PolyLoRADense; the router's [tasks, splits * skills] is
        # peft's `view(-1, n_splits, n_skills)` of it.
        want = {"poly_lora_A": (splits, skills, dense.in_features // splits, r),
                "poly_lora_B": (splits, skills, r, dense.out_features // splits),
                "poly_router.module_logits": (tasks, splits * skills)}
        for key, shape in want.items():
            _check_shape(adapter, key, name, parts[key].shape, shape)
        weights[path] = {"poly_a": parts["poly_lora_A"], "poly_b": parts["poly_lora_B"],
                         "router_logits": parts["poly_router.module_logits"].reshape(
                             tasks, splits, skills)}
    config = dict(method="mhr" if splits > 1 else "poly", rank=r, num_skills=skills,
                  num_splits=splits, alpha=1.0)  # peft's poly scale is 1/r
    return Imported(config, weights, num_task_ids=tasks)


_IMPORTERS = {"lora": _import_lora, "ia3": _import_ia3, "prompt_tuning": _import_prompt,
              "poly": _import_poly}


def _without_base_copies(adapter: HFAdapter, model: T5) -> HFAdapter:
    """Drop the copies of base weights peft saves beside some adapters (`lm_head` or embedding
    targets: `lm_head.base_layer.weight`, resized `shared.weight`), after checking that they are
    this base's weights: an adapter that changes base weights is not expressible."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    base = {hf: (ours, transpose) for ours, hf, transpose in _hf_key_map(model.config)}
    for tied in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        base[tied] = base["shared.weight"]
    if model.config.tie_word_embeddings:
        base["lm_head.weight"] = base["shared.weight"]
    kept = {}
    for key, value in adapter.tensors.items():
        name = key.removeprefix(PREFIX).replace(".base_layer.", ".")
        if name not in base:
            kept[key] = value
            continue
        ours, transpose = base[name]
        weight = flat[ours].value
        shape = tuple(weight.shape[::-1] if transpose else weight.shape)
        same = shape == value.shape
        if same and not isinstance(weight, jax.core.Tracer):  # a tracer: shapes-only accounting
            weight = np.asarray(weight, np.float32)
            same = np.allclose(weight.T if transpose else weight, value, rtol=1e-5, atol=1e-6)
        if not same:
            raise PeftInteropError(
                f"{adapter.path!r} carries its own {name!r} (shape {value.shape}) that differs "
                f"from this base's (shape {shape}): the adapter was made for another base "
                "model, or it changes base weights (resized or trained embeddings, "
                f"modules_to_save), which peftjax cannot express. {_base_hint(adapter)}")
    return dataclasses.replace(adapter, tensors=kept)


def import_adapter(adapter: HFAdapter, model: T5) -> Imported:
    """Translate a read HF adapter for the (not yet adapted) base `model`."""
    method = PEFT_TYPES.get(adapter.peft_type)
    if method is None:
        raise PeftInteropError(
            f"{adapter.path!r} is a peft_type={adapter.peft_type!r} adapter; peftjax loads "
            f"{sorted(PEFT_TYPES)} (as config.peft.method {sorted(PEFT_TYPES.values())}).")
    return _IMPORTERS[method](_without_base_copies(adapter, model), model)


# --------------------------------------------------------------------------- load


def _common_config(imported: dict[str, Imported], per_task: bool,
                   projections: list[str]) -> PeftConfig:
    """One PeftConfig for every adapter of a library; they must agree on its structure.

    `projections`: every projection path of the base, among which `targets` must select exactly
    the adapted ones."""
    names = list(imported)
    first = imported[names[0]]
    structure = ("method", "rank", "dora", "ia3_feedforward", "num_virtual_tokens")
    for name in names[1:]:
        other = imported[name]
        for key in structure:
            if first.config.get(key) != other.config.get(key):
                raise PeftInteropError(
                    f"Adapters {names[0]!r} and {name!r} differ in {key} "
                    f"({first.config.get(key)!r} vs {other.config.get(key)!r}); one per-task "
                    "model needs the same method, target modules and rank for every task. "
                    "Load them separately, or re-train them alike.")
        if sorted(first.weights) != sorted(other.weights):
            only = sorted(set(first.weights) ^ set(other.weights))
            raise PeftInteropError(
                f"Adapters {names[0]!r} and {name!r} adapt different modules (e.g. {only[:3]}); "
                "one per-task model needs the same target modules for every task.")
    fields = dict(first.config)
    if first.weights and fields["method"] != "prompt_tuning":
        paths = sorted(first.weights)
        fields["targets"] = _paths_regex(paths, projections)
    return PeftConfig(mode="per_task" if per_task else "shared", **fields)


def _copy_weights(model: T5, imported: list[Imported], per_task: bool) -> None:
    modules = module_paths(model)
    for path in imported[0].weights:
        module = modules[path]
        for attr in imported[0].weights[path]:
            values = []
            for imp in imported:
                value = imp.weights[path][attr]
                if attr == "lora_b":  # fold the adapter's own scale into B where it differs
                    ratio = imp.lora_scale[path] / module.scale
                    value = value if ratio == 1.0 else (value * ratio).astype(np.float32)
                values.append(value)
            variable = getattr(module, attr)
            stacked = np.stack(values) if per_task else values[0]
            if stacked.shape != variable.value.shape:  # an importer bug, not a user error
                raise AssertionError(f"{path}.{attr}: {stacked.shape} vs {variable.value.shape}")
            variable.value = jnp.asarray(stacked, variable.value.dtype)


def load_peft(base_hf_dir: str, adapters: str | os.PathLike | Mapping[str, str],
              **config_overrides) -> T5:
    """HF T5 base + HF peft adapter(s) → a peftjax model with the adapter(s) attached.

    Args:
      base_hf_dir: HF T5 directory (config.json + model.safetensors), as for `from_hf`.
      adapters: one adapter directory (a shared model), or `{task name: adapter directory}`
        for one per-task model whose task id is the position in the dict.
      config_overrides: non-shape `T5Config` fields, as for `from_hf` (e.g. `dtype`).

    Returns a `T5` callable like `from_hf`'s, e.g.
    `model(encoder_input_tokens=..., decoder_input_tokens=..., task_ids=...)` → logits. A Poly /
    MHR adapter (peft's POLY) routes by task: pass `task_ids` < its `n_tasks`, as to peft.
    """
    per_task = isinstance(adapters, Mapping)
    named = dict(adapters) if per_task else {"adapter": adapters}
    if not named:
        raise PeftInteropError("load_peft got an empty dict of adapters; pass "
                               "{task name: adapter directory}.")
    model = from_hf(os.fspath(base_hf_dir), **config_overrides)
    projections = sorted(hf_module_names(model.config))
    imported = {name: import_adapter(read_adapter(path), model) for name, path in named.items()}
    routed = [name for name, imp in imported.items() if imp.num_task_ids]
    if routed and per_task:
        raise PeftInteropError(f"Adapter {routed[0]!r} is a Poly/MHR adapter, which routes tasks "
                               "itself (task_ids index its router); load it alone: "
                               "load_peft(base, adapter_dir).")
    config = _common_config(imported, per_task, projections)
    num_tasks = len(named) if per_task else imported["adapter"].num_task_ids
    apply_peft(model, config, num_tasks=num_tasks, rngs=nnx.Rngs(0))
    _copy_weights(model, list(imported.values()), per_task)
    return model


def attach_adapter(model: T5, adapter_dir: str | os.PathLike) -> tuple[PeftConfig, list[str]]:
    """Attach one HF peft adapter directory to the bare base `model`, in place, weights copied
    in: `load_peft` on a base already built (e.g. from shapes alone, under `nnx.eval_shape`).

    Returns the `PeftConfig` it attached and the adapted paths (`module_paths(model)[path]` is
    the adapter module there). A Poly / MHR adapter (method "poly" / "mhr") routes by task id.
    """
    with jax.ensure_compile_time_eval():  # concrete (numpy) tensors even under eval_shape
        adapter = read_adapter(adapter_dir)
    imported = import_adapter(adapter, model)
    config = _common_config({"adapter": imported}, False, sorted(hf_module_names(model.config)))
    adapted = apply_peft(model, config, num_tasks=imported.num_task_ids, rngs=nnx.Rngs(0))
    _copy_weights(model, [imported], False)
    return config, adapted


# --------------------------------------------------------------------------- save


def _method_of(module: nnx.Module) -> str | None:
    from peftjax.peft.ia3 import IA3Dense
    from peftjax.peft.lora import LoRADense
    from peftjax.peft.prompt import PromptTuning

    for cls, method in ((LoRADense, "lora"), (IA3Dense, "ia3"), (PromptTuning, "prompt_tuning")):
        if type(module) is cls:
            return method
    return None


def _adapter_modules(model: T5) -> tuple[str, dict[str, nnx.Module]]:
    """(method, {path: module}) of every module that owns PEFT state; refuses what HF peft has
    no format for."""
    modules = module_paths(model)
    state = nnx.state(model, nnx.Any(PeftParam, FrozenAdapter))
    owners = sorted({".".join(map(str, path[:-1])) for path, _ in nnx.to_flat_state(state)})
    if not owners:
        raise PeftInteropError("The model has no PEFT modules to save; attach an adapter first "
                               "(apply_peft, or a run with config.peft.method set).")
    methods = {}
    for path in owners:
        method = _method_of(modules.get(path))
        if method is None:
            kind = type(modules[path]).__name__ if path in modules else "nested state"
            raise PeftInteropError(
                f"{path!r} holds a {kind}, which has no HF peft equivalent peftjax can write; "
                "export supports config.peft.method lora (incl. rsLoRA, DoRA), ia3 and "
                "prompt_tuning, without compositions.")
        methods[path] = method
    if len(set(methods.values())) > 1:
        raise PeftInteropError(f"The model mixes PEFT methods {sorted(set(methods.values()))}; "
                               "an HF peft adapter directory holds one.")
    return next(iter(methods.values())), {p: modules[p] for p in owners}


def _task_slicer(modules: dict[str, nnx.Module], task: int | None):
    """`value → value for the chosen task` (identity for shared models), after checking `task`."""
    per_task = {bool(m.per_task) for m in modules.values()}
    if per_task == {False}:
        if task is not None:
            raise PeftInteropError(f"task={task!r} given, but the model's adapter is shared by "
                                   "all tasks; drop task=.")
        return lambda value: np.asarray(value, np.float32)
    first = next(iter(modules.values()))
    leading = next(v for v in (getattr(first, a, None) for a in ("lora_b", "ia3_l", "prompt"))
                   if v is not None)
    num_tasks = leading.value.shape[0]
    if task is None or isinstance(task, bool) or not 0 <= int(task) < num_tasks:
        raise PeftInteropError(
            f"The model has one adapter per task ({num_tasks} tasks); pass task=<id in "
            f"0..{num_tasks - 1}> to save that task's adapter (got task={task!r}).")
    return lambda value: np.asarray(value[int(task)], np.float32)


def _suffix_match(name: str, target: str) -> bool:  # peft's list form of target_modules
    return name == target or name.endswith("." + target)


def _target_list(hf_names: list[str], universe: list[str],
                 match=_suffix_match) -> tuple[list[str], bool]:
    """A peft module list selecting exactly `hf_names` among `universe` under `match`: the
    leaf names (`["q", "v"]`, short=True) when they are exact, else the full names."""
    leaves = sorted({_leaf(n) for n in hf_names})
    if {n for n in universe if any(match(n, leaf) for leaf in leaves)} == set(hf_names):
        return leaves, True
    return sorted(hf_names), False


def _export_lora(modules, hf_names, take) -> tuple[dict, dict[str, np.ndarray]]:
    doras = {m.lora_magnitude is not None for m in modules.values()}
    if len(doras) > 1:
        raise PeftInteropError("Some LoRA modules use DoRA and some do not; HF peft's use_dora "
                               "is one flag per adapter.")
    tensors, ranks, alphas = {}, {}, {}
    for path, m in modules.items():
        name = hf_names[path]
        a_ir, b_ro = take(m.lora_a.value), take(m.lora_b.value)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a_ir.T)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b_ro.T)
        if m.lora_magnitude is not None:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = take(m.lora_magnitude.value)
        ranks[name] = a_ir.shape[1]
        alphas[name] = float(m.scale) * ranks[name]  # exact as plain LoRA, rsLoRA or not
    rank, alpha = ranks[min(ranks)], alphas[min(alphas)]
    dropouts = {float(m.dropout_rate) for m in modules.values()}
    config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha,
        "target_modules": _target_list(sorted(ranks), sorted(hf_names.values()))[0],
        "rank_pattern": {n: r for n, r in ranks.items() if r != rank},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha},
        "use_rslora": False, "use_dora": doras == {True}, "lora_dropout": max(dropouts),
        "fan_in_fan_out": False, "bias": "none", "init_lora_weights": True,
        "modules_to_save": None,
    }
    return config, tensors


def _export_ia3(modules, hf_names, take) -> tuple[dict, dict[str, np.ndarray]]:
    tensors, targets, feedforward = {}, [], []
    for path, m in modules.items():
        name = hf_names[path]
        vector = take(m.ia3_l.value)
        tensors[f"{PREFIX}{name}.ia3_l"] = vector[None] if m.feedforward else vector[:, None]
        targets.append(name)
        if m.feedforward:
            feedforward.append(name)
    target_modules, short = _target_list(targets, sorted(hf_names.values()))
    # peft tests feed-forward membership with a bare `endswith` among the targeted modules, and
    # wants feedforward_modules to be a subset of target_modules: both short or both full.
    ff, ff_short = _target_list(feedforward, targets, match=lambda n, t: n.endswith(t))
    if not (short and ff_short):
        target_modules, ff = sorted(targets), sorted(feedforward)
    config = {"peft_type": "IA3", "target_modules": target_modules, "feedforward_modules": ff,
              "fan_in_fan_out": False, "init_ia3_weights": True, "modules_to_save": None}
    return config, tensors


def _export_prompt(modules, hf_names, take, model: T5) -> tuple[dict, dict[str, np.ndarray]]:
    del hf_names
    (m,) = modules.values()
    prompt_pd = take(m.prompt.value)
    p, cfg = prompt_pd.shape[0], model.config
    # peft's seq2seq prompt table has a second block of p rows it never uses for prompt tuning
    # (it prepends only the first p to the encoder input): zeros.
    table = np.concatenate([prompt_pd, np.zeros_like(prompt_pd)])
    config = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": p, "token_dim": cfg.d_model,
              "num_transformer_submodules": 2, "num_attention_heads": cfg.num_heads,
              "num_layers": cfg.num_encoder_layers, "prompt_tuning_init": "RANDOM",
              "prompt_tuning_init_text": None, "tokenizer_name_or_path": None}
    return config, {"prompt_embeddings": table}


def save_peft(model: T5, out_dir: str | os.PathLike, *, task: int | None = None,
              base_model_name_or_path: str = "") -> None:
    """Write `model`'s adapter as an HF peft directory (`adapter_config.json`,
    `adapter_model.safetensors`) that `peft.PeftModel.from_pretrained(base, out_dir)` loads with
    the same logits.

    Args:
      model: a peftjax T5 with LoRA (incl. rsLoRA / DoRA), (IA)^3 or prompt tuning attached.
      task: for a per-task model, the id of the task whose adapter to write (required there).
      base_model_name_or_path: recorded in adapter_config.json (the HF base it belongs to).
    """
    method, modules = _adapter_modules(model)
    take = _task_slicer(modules, task)
    hf_names = hf_module_names(model.config)
    if method == "lora":
        config, tensors = _export_lora(modules, hf_names, take)
    elif method == "ia3":
        config, tensors = _export_ia3(modules, hf_names, take)
    else:
        config, tensors = _export_prompt(modules, hf_names, take, model)
    config.update(task_type=SEQ2SEQ, base_model_name_or_path=base_model_name_or_path or None,
                  inference_mode=True, revision=None)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
              os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(dict(sorted(config.items())), f, indent=2)
