"""The configuration schema: every key a run reads, with its default.

Experiment files in `configs/` start from `default_config()` and change what they need;
`validate()` then rejects keys the schema does not know (typos) before anything is written.
"""

from __future__ import annotations

import difflib
import json
from typing import Any

from ml_collections import ConfigDict

from peftjax.sharding.mesh import DEFAULT_RULES
from peftjax.sharding.presets import DEFAULT_SHAPE, DEFAULT_TENSOR_PARALLEL


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


def default_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0

    c.model = ConfigDict()
    c.model.size = "tiny"  # tiny | mini (ours) | small | base | large | xl | xxl (T5 v1.1)
    c.model.hf_path = ""  # HF T5 checkpoint directory; overrides `size` when set
    c.model.vocab_size = 0  # 0 = the preset's (or checkpoint's) vocabulary size
    c.model.dropout_rate = 0.0
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (on accelerators). Trainable
    # (PEFT) weights, their gradients and optimizer state stay float32 masters whatever it is;
    # norms, softmaxes, router gates, logits and the loss are computed in float32.
    c.model.param_dtype = "float32"  # storage of the FROZEN base: float32 | bfloat16 (halves
    # its memory). method=full trains the base, so it needs float32 (else a ConfigError).
    # Run each layer stack as one jax.lax.scan (compile time flat in depth) instead of unrolled;
    # same parameters, paths and values. Needs PEFT modules alike in every layer (hypernetwork
    # methods are refused).
    c.model.scan_layers = False
    # Rematerialise each layer in the backward pass: none | full (keep nothing, recompute the
    # layer) | dots (keep matmul outputs) | dots_no_batch (keep weight matmuls only), after
    # jax.checkpoint_policies. Same values; trades compute for activation memory.
    c.model.remat = "none"

    c.peft = ConfigDict()
    # lora | houlsby | pfeiffer | parallel | compacter | compacter_pp | phm | ia3 | prompt_tuning
    # | prefix_tuning | ln_tuning | road | sparse | full (all weights) | none
    c.peft.method = "lora"
    c.peft.mode = "shared"  # shared | per_task (one adapter per task, picked by task id)
    c.peft.targets = ""  # regex over module paths; "" = the method's default insertion points
    c.peft.num_tasks = 0  # per_task table size; 0 = from the data (largest task id + 1)
    # LoRA family
    c.peft.rank = 8
    c.peft.alpha = 16.0
    c.peft.dropout = 0.0
    c.peft.rslora = False  # scale alpha / sqrt(rank)
    c.peft.dora = False  # DoRA: magnitude x normalised direction
    c.peft.freeze_a = False  # asymmetric LoRA: A frozen at its random init
    c.peft.lora_plus_ratio = 1.0  # LoRA+: lr(B) = ratio x lr(A); the paper suggests 16
    # Bottleneck adapters (houlsby, pfeiffer, parallel, compacter, compacter_pp, phm)
    c.peft.reduction_factor = 16  # width = d_model // reduction_factor
    c.peft.adapter_activation = "relu"
    c.peft.adapter_scale = 1.0
    c.peft.phm_dim = 4  # Kronecker summands n; d_model and the width must divide by it
    c.peft.phm_rank = 1  # rank of the per-layer factors (Compacter: 1)
    c.peft.adapter_bias = False  # biases in both projections (HyperFormer's adapters)
    c.peft.adapter_norm = False  # a LayerNorm on the adapter's output (HyperFormer's adapters)
    # (IA)^3: targets matching this are scaled on their input, the others on their output
    c.peft.ia3_feedforward = r".*mlp\.wo"
    # Prompt and prefix tuning
    c.peft.num_virtual_tokens = 8
    c.peft.prompt_init = "vocab"  # vocab (embeddings of sampled tokens) | random
    c.peft.prefix_projection = False  # train prefixes through an MLP
    c.peft.prefix_hidden = 0  # that MLP's width; 0 = d_model
    # RoAd
    c.peft.road_variant = "road_1"  # road_1 | road_2 | road_4
    c.peft.road_group_size = 64
    # Sparse fine-tuning
    c.peft.sparse_density = 0.01
    c.peft.sparse_mask_from = ""  # workdir of a first-pass run with method=full
    # Composition over frozen source adapters (trained runs' workdirs)
    c.peft.compose = "none"  # none | stack | parallel | average | scalearn | fusion | molora |
    # arrow (the last three route each token over the sources: see peftjax.routing)
    c.peft.sources = ()
    c.peft.compose_weights = ()
    c.peft.scalearn_form = "vector"  # vector | scalar | vector_shared | scalar_shared
    # Task routing over a skill inventory (method=poly / mhr)
    c.peft.num_skills = 4  # K LoRA skills per adapted layer
    c.peft.num_splits = 1  # MHR heads (A split along d_in, B along d_out); 1 = Poly
    c.peft.router = "learned"  # learned | uniform (average of the inventory, mu-routing)
    c.peft.router_temperature = 1.0  # relaxed-Bernoulli temperature in training
    c.peft.skills_from = ""  # a trained poly/mhr workdir: method=poly/mhr trains only the
    # routing over its frozen inventory (MHR-z); method=lora starts from its average (MHR-mu)
    # Token routing (method=molora / smora; compose=molora / arrow over sources)
    c.peft.num_experts = 4  # LoRA experts per site (molora)
    c.peft.top_k = 2  # experts (molora, arrow) or ranks (smora) per token
    c.peft.balance_coef = 0.01  # load-balancing loss weight (Switch Transformer)
    c.peft.arrow_temperature = 1.0  # softmax temperature over Arrow's top-k scores
    # Hypernetworks that generate the adapters (method=hyperformer / hyperformer_pp /
    # text_to_lora; see peftjax.hyper). config.peft.mode is not read: they condition on the task.
    c.peft.hyper_condition = "task"  # task | task_language (Hyper-X: + language embedding) |
    # description (the frozen encoder's mean-pooled embedding of each task's description)
    c.peft.hyper_generate = "per_task"  # per_task: once per task (or task x language) per call,
    # gathered per example | per_example: one generation per example (needs data.pack=False)
    c.peft.hyper_embed_dim = 64  # task / language / layer / position embedding width
    c.peft.hyper_hidden = 128  # hidden width of the projector MLP
    c.peft.hyper_proj_dim = 64  # the projector's output, which the weight heads read
    c.peft.hyper_norm = True  # generate a layer norm on each bottleneck's output (HyperFormer)
    c.peft.hyper_train_norms = False  # also train the base's layer norms (HyperFormer's setup)
    c.peft.num_languages = 0  # language embedding rows; 0 = from the data (largest id + 1)

    c.data = ConfigDict()
    c.data.mixture = "synthetic_suite"  # a seqio Task or Mixture name
    c.data.task_modules = ("tasks.synthetic",)  # modules whose import registers the tasks
    c.data.inputs_length = 32
    c.data.targets_length = 32
    c.data.batch_size = 32
    c.data.pack = True
    c.data.eval_examples = 64  # per task, for exact match through greedy decoding
    c.data.eval_batch_size = 64
    # Tasks never trained on, evaluated zero-shot by `peftjax eval` ("heldout" in metrics.json):
    # a seqio task or mixture name, or "" for none. Their ids get rows in the run's tables.
    c.data.heldout = ""

    c.optim = ConfigDict()
    c.optim.learning_rate = 1e-3
    c.optim.schedule = "cosine"  # cosine | constant
    c.optim.warmup_steps = 50
    c.optim.final_lr_fraction = 0.1
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8

    c.train = ConfigDict()
    c.train.steps = 1000
    c.train.log_every = 50
    c.train.eval_every = 0  # 0 = only at the end
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    c.train.progress = True  # progress bar on stderr
    # Micro-batches per optimizer step: the global batch (data.batch_size) is split into this
    # many along the batch axis, gradients summed over them in float32 and divided by the
    # total token count, so the update equals the one-big-batch update at 1/k the
    # activation memory. data.batch_size must divide by it x the data-parallel shards.
    c.train.grad_accum_steps = 1

    c.mesh = ConfigDict()
    # Mesh presets (peftjax.sharding.presets), over all N devices; one rules table for all:
    #   dp       data = N: the batch splits, every weight is replicated
    #   fsdp     fsdp = N: the batch splits, and every weight's `embed` dimension (the frozen
    #            base's above all; adapters split where they share a dimension with the base)
    #   fsdp_tp  model = tensor_parallel, fsdp = N / tensor_parallel: as fsdp, plus heads / MLP
    #            width / vocabulary over `model`
    # "" uses `shape` as given. A preset with a changed `shape` is an error (never ignored).
    c.mesh.preset = ""
    c.mesh.tensor_parallel = DEFAULT_TENSOR_PARALLEL  # the `model` axis of preset fsdp_tp (2)
    # data / fsdp / model sizes when preset is ""; one -1 takes the remaining devices
    c.mesh.shape = ConfigDict(dict(DEFAULT_SHAPE))
    # Logical axis -> mesh axis (None = replicated); every variable's axes must be named here.
    c.mesh.rules = DEFAULT_RULES
    return c


def from_saved(saved: dict[str, Any]) -> ConfigDict:
    """A run's saved config (its `config.json`) laid over today's defaults, so runs saved before
    a key existed still load; JSON lists become the tuples configs hold (mesh rules, sources)."""
    config = default_config()
    _overlay(config, saved)
    return config


def _overlay(config: ConfigDict, saved: dict[str, Any]) -> None:
    for key, value in saved.items():
        if isinstance(value, dict) and isinstance(config.get(key), ConfigDict):
            _overlay(config[key], value)
        else:
            config[key] = _tuples(value)


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def validate(config: ConfigDict) -> ConfigDict:
    """Reject unknown keys (with close matches) and values of the wrong type."""
    _check(config, default_config(), "config")
    return config


def check_key(dotted: str) -> None:
    """Raise ConfigError naming close matches if `section.key` is not in the schema."""
    node, prefix = default_config(), "config"
    for part in dotted.split("."):
        if not isinstance(node, ConfigDict) or prefix == "config.mesh.shape":
            return
        if part not in node:
            close = difflib.get_close_matches(part, list(node.keys()), n=3)
            hint = f" Did you mean {', '.join(f'{prefix}.{c}' for c in close)}?" if close else ""
            raise ConfigError(f"Unknown config key '{prefix}.{part}'.{hint} Known keys under "
                              f"{prefix}: {sorted(node.keys())}.")
        node, prefix = node[part], f"{prefix}.{part}"


def _check(given: ConfigDict, schema: ConfigDict, prefix: str) -> None:
    for key in given:
        path = f"{prefix}.{key}"
        if key not in schema:
            check_key(path.removeprefix("config."))
        value, default = given[key], schema[key]
        if isinstance(default, ConfigDict) and path != "config.mesh.shape":
            if not isinstance(value, ConfigDict):
                raise ConfigError(f"{path} must be a group of keys, got {value!r}.")
            _check(value, default, path)
        elif not _same_kind(value, default):
            raise ConfigError(f"{path} should be a {type(default).__name__} like {default!r}, "
                              f"got {value!r}.")


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, int | float):
        return isinstance(value, int | float)
    if isinstance(default, tuple | list):
        return isinstance(value, tuple | list)
    return isinstance(value, type(default))


def to_json(config: ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)
