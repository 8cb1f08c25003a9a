"""Poly and MHR: each task mixes an inventory of LoRA skills in weight space.

Polytropon (Ponti et al. 2023) keeps K LoRA skills per adapted projection and a task x skill
logit table Z. For task t the projection gets one LoRA whose factors are mixtures of the skills':

    w_k = sigmoid((Z_tk + L_k) / tau)   while training, L_k ~ Logistic(0, 1) (relaxed Bernoulli)
    w_k = sigmoid(Z_tk)                 at eval
    w  <- w / (sum_k w_k + eps)
    A_t = sum_k w_k A_k,  B_t = sum_k w_k B_k,  y = W0 x + x A_t B_t / r.

Multi-Head Routing (MHR, Caccia et al. 2023) splits A along d_in and B along d_out into h heads
("splits") and routes each head separately: Z is `[tasks, h, K]`, head j of A_t mixes the
skills' head j. `method="mhr"` is the same module as `"poly"`; the heads come from
`config.peft.num_splits` (MHR with num_splits=1 is Poly). Both follow HF peft's `poly` tuner
(`peft.tuners.poly`): the same layouts (`poly_a` `[h, K, d_in/h, r]`, `poly_b` `[h, K, r,
d_out/h]`; head j covers the j-th contiguous block of inputs / outputs), init (each A block
Kaiming-uniform with fan_in = d_in/h, B zeros, logits U(-1e-3, 1e-3)) and scale 1/r, except
that the scale is `config.peft.alpha / r` as for LoRA: peft's poly is alpha = 1 (what imported
peft adapters get), while the suite's LoRA runs at alpha = 16, and at alpha = 1 the same learning
rate moves a Poly update ~16x less than that LoRA's (measured: bench/RESULTS.md).

Variants (config.peft):
  * `router="uniform"`: no logits; every skill weighs 1/K (the inventory's average, mu-routing).
  * `skills_from=<workdir of a trained poly/mhr run>`:
      - with method poly/mhr: MHR-z. The run's inventory is copied in as `FrozenAdapter` and
        only the fresh router logits train.
      - with method lora: MHR-mu. The LoRA starts from the uniformly routed inventory
        (`skill_average`), so at init it computes exactly that run's mu-routed update.

Task ids: `[batch]` ids mix A and B per example (training noise drawn per example, as peft).
Per-token ids `[batch, length]` (packed rows) mix once per task row of the table (noise per task
row, shared by every token of that task in the batch) and apply the table through
`task_select.project_in/project_out`'s one-hot path. At eval both give the same update.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models.context import Context, site_salt
from peftjax.models.layers import Dense
from peftjax.peft.config import PeftConfig
from peftjax.peft.inject import module_paths
from peftjax.peft.registry import MethodSpec, Site
from peftjax.peft.runs import check_fits, load_trained, read_config
from peftjax.peft.task_select import check_ids, project_in, project_out
from peftjax.peft.variables import Adapter, FrozenAdapter, Router
from peftjax.routing.record import record_weights

EPS = 1e-12  # as peft: normalising sigmoid weights that all underflow stays finite
LOGIT_INIT = 1e-3  # router logits start U(-1e-3, 1e-3): every skill weighs ~1/K
KEY = "skills_from"
ROUTED = ("poly", "mhr")


# --------------------------------------------------------------------------- pure math


def split_width(features: int, num_splits: int, what: str, where: str = "") -> int:
    """`features // num_splits`, or a ValueError naming config.peft.num_splits."""
    if features % num_splits:
        divisors = [d for d in range(1, features + 1) if features % d == 0]
        at = f" of {where}" if where else ""
        raise ValueError(f"config.peft.num_splits={num_splits} does not divide the {what} width "
                         f"{features}{at}: MHR splits it into equal heads. Set "
                         f"config.peft.num_splits to a divisor of every targeted width (here one "
                         f"of {divisors[:12]}), or target other projections.")
    return features // num_splits


def mixing_weights(logits: jax.Array, temperature: float = 1.0,
                   noise_key: jax.Array | None = None) -> jax.Array:
    """Skill weights `[..., K]` from logits `[..., K]`, rows summing to 1.

    `noise_key` None (eval): `sigmoid(Z)`. Else a relaxed-Bernoulli sample (torch's
    `RelaxedBernoulli(temperature, logits).rsample()`): `sigmoid((Z + L) / tau)` with L drawn by
    `jax.random.logistic(noise_key, Z.shape)`. Then normalised over skills (+EPS, as peft).
    """
    logits = logits.astype(jnp.float32)
    if noise_key is not None:
        noise = jax.random.logistic(noise_key, logits.shape, jnp.float32)
        logits = (logits + noise) / temperature
    w = jax.nn.sigmoid(logits)
    return w / (jnp.sum(w, axis=-1, keepdims=True) + EPS)


def mix_a(w_bhk: jax.Array, a_hkdr: jax.Array) -> jax.Array:
    """Per-row A `[b, d_in, r]`: head j of row b is `sum_k w[b, j, k] A[j, k]` (heads stacked
    along d_in, as peft's reshape)."""
    a_bhdr = jnp.einsum("bhk,hkdr->bhdr", w_bhk, a_hkdr)
    b, h, d, r = a_bhdr.shape
    return a_bhdr.reshape(b, h * d, r)


def mix_b(w_bhk: jax.Array, b_hkro: jax.Array) -> jax.Array:
    """Per-row B `[b, r, d_out]`: heads side by side along d_out (peft's `transpose(1, 2)`)."""
    b_brho = jnp.einsum("bhk,hkro->brho", w_bhk, b_hkro)
    b, r, h, o = b_brho.shape
    return b_brho.reshape(b, r, h * o)


def skill_average(poly_a: jax.Array, poly_b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The uniformly routed inventory as one LoRA pair: `(a_ir [d_in, r], b_ro [r, d_out])`.

    `poly_a` `[h, K, d_in/h, r]`, `poly_b` `[h, K, r, d_out/h]`. Each head's factors are the mean
    over skills, concatenated over heads; `x a b / r` is the poly delta with weights 1/K (MHR-mu).
    Note the poly scale 1/r is not in `b`.
    """
    uniform = jnp.full((1, poly_a.shape[0], poly_a.shape[1]), 1.0 / poly_a.shape[1],
                       jnp.result_type(poly_a))
    return mix_a(uniform, poly_a)[0], mix_b(uniform, poly_b)[0]


# --------------------------------------------------------------------------- the module


class PolyLoRADense(nnx.Module):
    """A frozen `Dense` plus a task-routed mixture of LoRA skills (Poly; MHR with num_splits>1).

    `poly_a` `[splits, skills, in/splits, r]`: each block Kaiming-uniform, bound 1/sqrt(in/splits).
    `poly_b` `[splits, skills, r, out/splits]`: zeros, so the layer starts equal to the base.
      Both `Adapter` (or `FrozenAdapter` under MHR-z).
    `router_logits` `[tasks, splits, skills]` (`Router`), U(-1e-3, 1e-3); None with
      `router="uniform"` (weights 1/K, no task ids needed).
    `scale`: alpha / r (peft's poly: alpha = 1).
    """

    def __init__(self, base: Dense, *, rank: int, num_skills: int, num_splits: int = 1,
                 num_tasks: int | None, router: str = "learned", temperature: float = 1.0,
                 alpha: float = 1.0, path: str = "", rngs: nnx.Rngs):
        if rank <= 0 or num_skills <= 0 or num_splits <= 0:
            raise ValueError(f"Poly needs positive config.peft.rank / num_skills / num_splits, "
                             f"got {rank} / {num_skills} / {num_splits}.")
        if router == "learned" and not num_tasks:
            raise ValueError("Poly's router has one row of logits per task id, so it needs the "
                             "number of task ids (apply_peft(num_tasks=...); in a run it comes "
                             "from the data or config.peft.num_tasks).")
        d_in = split_width(base.in_features, num_splits, "input", path)
        d_out = split_width(base.out_features, num_splits, "output", path)
        self.base = base
        in_axis, out_axis = base.kernel.get_metadata()["axes"]
        bound = 1.0 / math.sqrt(d_in)  # torch kaiming_uniform_(a=sqrt 5) of an [r, d_in] block
        a = jax.random.uniform(rngs.params(), (num_splits, num_skills, d_in, rank), jnp.float32,
                               -bound, bound)
        self.poly_a = Adapter(a, axes=("splits", "skills", in_axis, "lora_rank"))
        self.poly_b = Adapter(jnp.zeros((num_splits, num_skills, rank, d_out), jnp.float32),
                              axes=("splits", "skills", "lora_rank", out_axis))
        self.router_logits = Router(
            jax.random.uniform(rngs.params(), (num_tasks, num_splits, num_skills), jnp.float32,
                               -LOGIT_INIT, LOGIT_INIT),
            axes=("tasks", "splits", "skills")) if router == "learned" else None
        self.num_tasks = num_tasks
        self.num_skills, self.num_splits, self.rank = num_skills, num_splits, rank
        self.temperature = temperature
        self.scale = alpha / rank
        self.salt = site_salt(path)

    # ---- routing

    def task_weights(self) -> jax.Array:
        """Eval-time weights of every task, `[tasks, splits, skills]` (rows sum to 1); the
        uniform router gives 1/K everywhere (one row when it was built without a task count)."""
        if self.router_logits is None:
            return jnp.full((self.num_tasks or 1, self.num_splits, self.num_skills),
                            1.0 / self.num_skills, jnp.float32)
        return mixing_weights(self.router_logits.value)

    def _noise_key(self, ctx: Context) -> jax.Array | None:
        if ctx.dropout_key is None:
            return None
        return jax.random.fold_in(ctx.dropout_key, self.salt)

    def _check_ids(self, task_ids: jax.Array | None, x_btd: jax.Array) -> jax.Array:
        task_ids = check_ids(task_ids, x_btd, needs="Poly/MHR routes by task")
        if not isinstance(task_ids, jax.core.Tracer):  # concrete: say which id and the fix
            ids = np.asarray(task_ids)
            bad = ids[(ids < 0) | (ids >= self.num_tasks)]
            if bad.size:
                raise ValueError(
                    f"task id {int(bad[0])} outside the router's table of {self.num_tasks} "
                    f"tasks (ids 0..{self.num_tasks - 1}); set config.peft.num_tasks to more "
                    f"than the largest id, or use ids < {self.num_tasks}.")
        return task_ids

    def _task_logits(self, ids: jax.Array) -> jax.Array:
        # Under jit an id outside the table gathers NaN logits, so the output is NaN rather
        # than silently using a clamped row.
        return jnp.take(self.router_logits.value, ids, axis=0, mode="fill", fill_value=jnp.nan)

    # ---- forward

    def delta(self, x_btd: jax.Array, ctx: Context) -> jax.Array:
        """What the skills add to the base output, `[b, t, out]`."""
        x_btd = x_btd.astype(self.base.dtype)
        a_hkdr, b_hkro = self.poly_a.value, self.poly_b.value
        if self.router_logits is None:  # uniform: one mean LoRA, task ids not needed
            a_ir, b_ro = skill_average(a_hkdr, b_hkro)
            lead = x_btd.shape[:1] if ctx.task_ids is None else ctx.task_ids.shape
            w = jnp.full((*lead, self.num_splits, self.num_skills), 1.0 / self.num_skills)
            record_weights(self, w)
            y = x_btd @ a_ir.astype(x_btd.dtype) @ b_ro.astype(x_btd.dtype)
            return self.scale * y
        ids = self._check_ids(ctx.task_ids, x_btd)
        key = self._noise_key(ctx)
        if ids.ndim == 1:
            w_bhk = mixing_weights(self._task_logits(ids), self.temperature, key)
            record_weights(self, w_bhk)
            a_bir = mix_a(w_bhk, a_hkdr).astype(x_btd.dtype)
            b_bro = mix_b(w_bhk, b_hkro).astype(x_btd.dtype)
            h_btr = jnp.einsum("btd,bdr->btr", x_btd, a_bir)
            return self.scale * jnp.einsum("btr,bro->bto", h_btr, b_bro)
        # Per-token ids: one mixed pair per task row, applied through the one-hot path.
        w_thk = mixing_weights(self.router_logits.value, self.temperature, key)
        valid_bt = (ids >= 0) & (ids < self.num_tasks)
        record_weights(self, jnp.take(w_thk, ids, axis=0, mode="fill", fill_value=jnp.nan))
        code = project_in(x_btd, mix_a(w_thk, a_hkdr), ids)
        y = self.scale * project_out(code, mix_b(w_thk, b_hkro), ids)
        return jnp.where(valid_bt[..., None], y, jnp.nan)  # one-hot of a bad id is all zeros

    def __call__(self, x_btd: jax.Array, ctx: Context) -> jax.Array:
        return self.base(x_btd, ctx) + self.delta(x_btd, ctx)


# --------------------------------------------------------------------------- skills_from


def _is_abstract(base: Dense) -> bool:
    # Parameter accounting builds under nnx.eval_shape: shapes only, nothing to load.
    return isinstance(base.kernel.value, jax.core.Tracer)


def _target_paths(site: Site, config: PeftConfig) -> list[str]:
    """This run's adapted paths (at the first site nothing is replaced yet: all are Dense)."""
    pattern = re.compile(config.target_regex)
    return sorted(p for p, m in module_paths(site.model).items()
                  if pattern.fullmatch(p) and isinstance(m, Dense))


def load_inventory(workdir: str, site: Site, config: PeftConfig, *,
                   with_weights: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """`{path: (poly_a, poly_b, scale)}` of the trained poly/mhr run in `workdir`, after checking
    that it fits this run: same base, same targets and rank, and for MHR-z the same skills and
    splits.
    `with_weights=False` checks the config only and returns `{}` (shape-only builds)."""
    run_config = read_config(workdir, KEY)
    theirs = run_config.peft
    how = ("MHR-z (config.peft.method poly/mhr) trains a router over it" if
           config.method in ROUTED else "MHR-mu (config.peft.method=lora) starts from its average")
    if theirs.method not in ROUTED:
        raise ValueError(
            f"config.peft.{KEY}={workdir!r} is a method={theirs.method!r} run; {how}, so it must "
            "be a trained poly or mhr run (e.g. peftjax train --config configs/mhr.py "
            "--workdir runs/mhr).")
    keys = ("rank", "num_skills", "num_splits") if config.method in ROUTED else ("rank",)
    for name in keys:
        if theirs[name] != getattr(config, name):
            raise ValueError(
                f"config.peft.{KEY}={workdir!r} has {name}={theirs[name]}, this run "
                f"{name}={getattr(config, name)}; {how}, so set --config.peft.{name}="
                f"{theirs[name]}.")
    check_fits(workdir, run_config, site.model_config, key=KEY, base=None)
    if not with_weights:
        return {}
    ours = _target_paths(site, config)
    exp, trained = load_trained(workdir, run_config)
    if sorted(exp.adapted_paths) != ours:
        only = sorted(set(exp.adapted_paths) ^ set(ours))
        raise ValueError(
            f"config.peft.{KEY}={workdir!r} adapts other projections than this run (they differ "
            f"at {only[:3]}); set config.peft.targets to that run's targets "
            f"({theirs.targets or 'its method default'!r}).")
    modules = module_paths(trained)
    return {p: (np.asarray(jax.device_get(modules[p].poly_a.value)),
                np.asarray(jax.device_get(modules[p].poly_b.value)), float(modules[p].scale))
            for p in ours}


def _inventory(site: Site, config: PeftConfig, abstract: bool) -> dict:
    """`load_inventory`, once per apply_peft (cached in `site.shared`)."""
    if "poly_inventory" not in site.shared:
        site.shared["poly_inventory"] = load_inventory(config.skills_from, site, config,
                                                       with_weights=not abstract)
    return site.shared["poly_inventory"]


def init_from_skills(lora, site: Site, config: PeftConfig) -> None:
    """MHR-mu: set a fresh `LoRADense` (in place) to the uniformly routed inventory of the poly/mhr
    run `config.skills_from`, so it computes exactly that run's mu-routed delta.

    The inventory's scale and LoRA's `lora.scale` may differ: `lora_b` carries their ratio. With
    DoRA the magnitude is re-set to the column norms, so DoRA also starts at that delta. A
    per-task LoRA starts every task from the same average.
    """
    from peftjax.peft.lora import dora_column_norms  # lora.py calls this function

    inventory = _inventory(site, config, _is_abstract(lora.base))
    if not inventory:
        return
    poly_a, poly_b, poly_scale = inventory[site.path]
    a_ir, b_ro = skill_average(jnp.asarray(poly_a), jnp.asarray(poly_b))
    b_ro = b_ro * (poly_scale / lora.scale)
    lead = lora.lora_a.value.shape[:-2]
    lora.lora_a.value = jnp.broadcast_to(a_ir, (*lead, *a_ir.shape)).astype(jnp.float32)
    lora.lora_b.value = jnp.broadcast_to(b_ro, (*lead, *b_ro.shape)).astype(jnp.float32)
    if lora.lora_magnitude is not None:
        lora.lora_magnitude.value = dora_column_norms(lora.base.kernel.value, lora.lora_a.value,
                                                      lora.lora_b.value, lora.scale)


# --------------------------------------------------------------------------- registry


def _build(base: Dense, site: Site, config: PeftConfig) -> PolyLoRADense:
    if config.mode != "shared":
        raise ValueError(f"config.peft.method={config.method!r} routes by task id already (one "
                         "inventory, a router row per task); set config.peft.mode='shared'.")
    if config.skills_from and config.router == "uniform":
        raise ValueError("config.peft.skills_from with config.peft.router='uniform' leaves "
                         "nothing to train (frozen inventory, no router). Use router='learned' "
                         "(MHR-z), or method=lora with skills_from (MHR-mu).")
    module = PolyLoRADense(base, rank=config.rank, num_skills=config.num_skills,
                                   num_splits=config.num_splits, num_tasks=site.num_task_ids,
                           router=config.router, temperature=config.router_temperature,
                           alpha=config.alpha, path=site.path, rngs=site.rngs)
    if config.skills_from:  # MHR-z: the trained inventory, frozen; the fresh router trains
        inventory = _inventory(site, config, _is_abstract(base))
        a, b, module.scale = inventory.get(
            site.path, (module.poly_a.value, module.poly_b.value, module.scale))
        module.poly_a = FrozenAdapter(jnp.asarray(a, jnp.float32),
                                      **module.poly_a.get_metadata())
        module.poly_b = FrozenAdapter(jnp.asarray(b, jnp.float32),
                                      **module.poly_b.get_metadata())
    return module


_SPEC = MethodSpec(
    kinds=(Dense,), targets=r".*attention\.(q|v)",  # as LoRA (HF peft's T5 default: q and v)
    build=_build, where="Dense projections: q, k, v, o, wi_0, wi_1, wo, lm_head")
SPECS = {"poly": _SPEC, "mhr": _SPEC}
