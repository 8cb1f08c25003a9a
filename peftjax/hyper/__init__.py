"""Hypernetworks that generate adapters: HyperFormer, HyperFormer++ / Hyper-X, Text-to-LoRA.

A hypernetwork is the model's `hypernet` insertion point. Per call it turns conditioning (task,
task x language, or a task description's embedding) into every adapted site's weights, a pytree
`{site path: {name: [rows, ...]}}` with one row per task or per example, which the sites gather
per example or token. `export.export_run` turns the rows into an ordinary per-task adapter run.
"""

from peftjax.hyper.condition import ConditionData, Conditioner, embed_descriptions
from peftjax.hyper.generator import HyperNetwork, SiteGroup, SiteInfo
from peftjax.hyper.methods import HyperBottleneck, HyperLoRADense

HYPER_METHODS = ("hyperformer", "hyperformer_pp", "text_to_lora")

__all__ = ["HYPER_METHODS", "ConditionData", "Conditioner", "HyperBottleneck", "HyperLoRADense",
           "HyperNetwork", "SiteGroup", "SiteInfo", "embed_descriptions"]
