"""Attach PEFT modules to a base model at insertion points chosen by a regex over module paths."""

from __future__ import annotations

import re
from typing import Any

from flax import nnx

from peftjax.peft.config import PeftConfig
from peftjax.peft.registry import Site, method_spec


def module_paths(model: nnx.Module) -> dict[str, nnx.Module]:
    """Every sub-module by dotted path, e.g. 'decoder.layers.3.cross_attention.v'."""
    return {".".join(map(str, path)): module for path, module in nnx.iter_modules(model) if path}


def apply_peft(model: nnx.Module, config: PeftConfig, *, num_tasks: int | None,
               rngs: nnx.Rngs, conditioning: Any = None) -> list[str]:
    """Replace the modules `config.target_regex` selects with the method's PEFT modules, in place.

    `conditioning` is what a hypernetwork method conditions on (`peftjax.hyper.ConditionData`;
    None: task ids only, `num_tasks` of them).

    Returns the adapted paths, sorted. Raises ValueError, naming the fix, when the regex matches
    nothing the method can attach to.
    """
    if config.method in ("none", "full"):
        return []
    if config.mode == "per_task" and not num_tasks:
        raise ValueError("config.peft.mode='per_task' needs the number of tasks; it comes from "
                         "the data (or set config.peft.num_tasks).")
    spec = method_spec(config.method)
    try:
        pattern = re.compile(config.target_regex)
    except re.error as e:
        raise ValueError(f"config.peft.targets={config.target_regex!r} is not a valid regex: "
                         f"{e}") from e
    paths = module_paths(model)
    matched = sorted(p for p in paths if pattern.fullmatch(p))
    usable = [p for p in matched if isinstance(paths[p], spec.kinds)]
    if not usable:
        examples = ", ".join(sorted(p for p, m in paths.items()
                                    if isinstance(m, spec.kinds))[:4])
        found = ""
        if matched:
            found = (f" It matched {matched[0]!r}, a {type(paths[matched[0]]).__name__}, which "
                     f"{config.method} cannot attach to.")
        raise ValueError(
            f"config.peft.targets={config.target_regex!r} matches no module that "
            f"{config.method!r} attaches to ({spec.where}; full match on the dotted path).{found}"
            f" Target paths like: {examples}, ...")
    tasks = num_tasks if config.mode == "per_task" else None
    shared: dict = {}
    for path in usable:
        site = Site(path=path, num_tasks=tasks, model_config=model.config, rngs=rngs,
                    shared=shared, model=model, num_task_ids=num_tasks,
                    conditioning=conditioning)
        replace_submodule(model, path, spec.build(submodule(model, path), site, config))
    if spec.finish is not None:
        spec.finish(model, site, config)
    return usable


def submodule(model: nnx.Module, dotted: str) -> nnx.Module:
    """The module at a dotted path ("" = `model` itself); list indices are path parts."""
    node = model
    for part in dotted.split(".") if dotted else []:
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def replace_submodule(model: nnx.Module, dotted: str, module: nnx.Module) -> None:
    """Put `module` at the dotted path, in place."""
    parent_path, _, name = dotted.rpartition(".")
    parent = submodule(model, parent_path)
    if name.isdigit():
        parent[int(name)] = module
    else:
        setattr(parent, name, module)
