"""`PeftConfig`: what to attach, where, and each method's knobs. Mirrors `config.peft`."""

from __future__ import annotations

import dataclasses

from peftjax.models.layers import ACTIVATIONS

MODES = ("shared", "per_task")
COMPOSE = ("none", "stack", "parallel", "average", "scalearn", "fusion", "molora", "arrow")
ROUTERS = ("learned", "uniform")
SCALEARN_FORMS = ("vector", "scalar", "vector_shared", "scalar_shared")
PROMPT_INITS = ("vocab", "random")
ROAD_VARIANTS = ("road_1", "road_2", "road_4")
HYPER_CONDITIONS = ("task", "task_language", "description")
HYPER_GENERATE = ("per_task", "per_example")


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """Every field is a key of `config.peft` (see `peftjax.config.default_config` for docs).

    Method-specific fields are read only by their method; `peftjax.peft.registry.METHODS` lists
    the methods.
    """

    method: str = "lora"
    mode: str = "shared"  # one adapter for all tasks, or one per task picked by task id
    targets: str | None = None  # regex over dotted module paths; None = the method's default
    # LoRA family
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank
    dora: bool = False  # weight-decomposed LoRA (magnitude x direction)
    freeze_a: bool = False  # asymmetric LoRA: A stays at its random init, only B trains
    lora_plus_ratio: float = 1.0  # LoRA+: learning rate of B = ratio x learning rate of A
    # Bottleneck adapters (houlsby, pfeiffer, parallel, compacter, compacter_pp, phm)
    reduction_factor: int = 16  # bottleneck width = d_model // reduction_factor
    adapter_activation: str = "relu"
    adapter_scale: float = 1.0  # s in h + s * U act(D h)
    phm_dim: int = 4  # n: number of Kronecker summands (PHM / Compacter)
    phm_rank: int = 1  # rank of the per-layer PHM factors (Compacter: 1)
    adapter_bias: bool = False  # biases in both projections (HyperFormer's adapters have them)
    adapter_norm: bool = False  # a LayerNorm on the adapter's output (HyperFormer's adapters)
    # (IA)^3
    ia3_feedforward: str = r".*mlp\.wo"  # targets scaled on their input (others: on output)
    # Prompt and prefix tuning
    num_virtual_tokens: int = 8
    prompt_init: str = "vocab"  # vocab (sampled token embeddings) | random
    prefix_projection: bool = False  # train prefixes through an MLP (folded away on export)
    prefix_hidden: int = 0  # hidden width of that MLP; 0 = d_model
    # RoAd
    road_variant: str = "road_1"  # road_1 | road_2 | road_4 (angle/scale sharing, as HF peft)
    road_group_size: int = 64
    # Sparse fine-tuning
    sparse_density: float = 0.01  # fraction of each targeted weight that may change
    sparse_mask_from: str = ""  # workdir of a first-pass run (method=full) to pick the mask from
    # Composition over frozen source adapters
    compose: str = "none"  # none | stack | parallel | average | scalearn
    sources: tuple[str, ...] = ()  # trained runs (workdirs) or HF peft adapter dirs to compose
    compose_weights: tuple[float, ...] = ()  # `average`: weights (default uniform)
    scalearn_form: str = "vector"  # vector | scalar | vector_shared | scalar_shared
    # Task routing over a skill inventory (poly, mhr)
    num_skills: int = 4  # K: LoRA skills in each layer's inventory
    num_splits: int = 1  # MHR heads: A split along d_in, B along d_out (1 = Poly)
    router: str = "learned"  # learned | uniform (the inventory's average: mu-routing)
    router_temperature: float = 1.0  # relaxed-Bernoulli temperature while training
    skills_from: str = ""  # workdir of a trained poly/mhr run: MHR-z (method=poly/mhr: its
    # inventory frozen, only the routing trains) or MHR-mu (method=lora: init from its average)
    # Token routing over experts (molora, smora; compose=molora/arrow over sources)
    num_experts: int = 4  # E: LoRA experts per site (molora)
    top_k: int = 2  # experts (molora, arrow) or ranks (smora) each token uses
    balance_coef: float = 0.01  # weight of the load-balancing loss (Switch Transformer)
    arrow_temperature: float = 1.0  # softmax temperature over Arrow's top-k |<v_e, x>|
    # Hypernetworks (hyperformer, hyperformer_pp, text_to_lora): see peftjax.hyper
    hyper_condition: str = "task"  # task | task_language (Hyper-X) | description (Text-to-LoRA)
    hyper_generate: str = "per_task"  # per_task (once per task, gathered) | per_example
    hyper_embed_dim: int = 64  # task / language / layer / position embedding width
    hyper_hidden: int = 128  # hidden width of the projector MLP
    hyper_proj_dim: int = 64  # its output: what the weight heads read
    hyper_norm: bool = True  # generate a layer norm on each bottleneck's output (HyperFormer)
    hyper_train_norms: bool = False  # also train the base's layer norms (HyperFormer's setup)

    def __post_init__(self):
        from peftjax.peft.registry import METHODS  # the registry imports this module

        if self.method not in METHODS:
            raise ValueError(f"Unknown config.peft.method {self.method!r}; choose from "
                             f"{tuple(METHODS)}.")
        if self.mode not in MODES:
            raise ValueError(f"Unknown config.peft.mode {self.mode!r}; choose from {MODES}.")
        if self.compose not in COMPOSE:
            raise ValueError(f"Unknown config.peft.compose {self.compose!r}; choose from "
                             f"{COMPOSE}.")
        if self.scalearn_form not in SCALEARN_FORMS:
            raise ValueError(f"Unknown config.peft.scalearn_form {self.scalearn_form!r}; choose "
                             f"from {SCALEARN_FORMS}.")
        for name in ("rank", "reduction_factor", "phm_dim", "phm_rank", "num_virtual_tokens",
                     "road_group_size", "num_skills", "num_splits", "num_experts", "top_k",
                     "hyper_embed_dim", "hyper_hidden", "hyper_proj_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config.peft.{name} must be a positive integer, got {value!r}.")
        choices = {"adapter_activation": tuple(ACTIVATIONS), "prompt_init": PROMPT_INITS,
                   "road_variant": ROAD_VARIANTS, "router": ROUTERS,
                   "hyper_condition": HYPER_CONDITIONS, "hyper_generate": HYPER_GENERATE}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"Unknown config.peft.{name} {getattr(self, name)!r}; choose "
                                 f"from {allowed}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"config.peft.dropout must be in [0, 1), got {self.dropout}.")
        if self.prefix_hidden < 0:
            raise ValueError("config.peft.prefix_hidden must be >= 0 (0 = d_model), got "
                             f"{self.prefix_hidden}.")
        if not 0.0 < self.sparse_density <= 1.0:
            raise ValueError("config.peft.sparse_density must be in (0, 1], got "
                             f"{self.sparse_density}.")
        if self.method == "molora" and self.top_k > self.num_experts:
            raise ValueError(f"config.peft.top_k={self.top_k} is larger than "
                             f"config.peft.num_experts={self.num_experts}: a token cannot use more "
                             "experts than there are; lower top_k or add experts.")
        if self.method == "smora" and self.top_k > self.rank:
            raise ValueError(f"config.peft.top_k={self.top_k} is larger than config.peft.rank="
                             f"{self.rank}: SMoRA's experts are the ranks; lower top_k.")
        for name in ("router_temperature", "arrow_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config.peft.{name} must be positive, got "
                                 f"{getattr(self, name)}.")
        if self.balance_coef < 0:
            raise ValueError(f"config.peft.balance_coef must be >= 0, got {self.balance_coef}.")
        if self.lora_plus_ratio <= 0:
            raise ValueError("config.peft.lora_plus_ratio must be positive (1 = plain LoRA), got "
                             f"{self.lora_plus_ratio}.")

    @property
    def target_regex(self) -> str:
        from peftjax.peft.registry import method_spec

        return self.targets if self.targets is not None else method_spec(self.method).targets
