"""Parameter-efficient fine-tuning modules and how they attach to a base model.

Methods are listed in `registry.METHODS`, each in its own module; `apply_peft` attaches one.
"""

from peftjax.peft.config import PeftConfig
from peftjax.peft.inject import apply_peft, module_paths
from peftjax.peft.registry import METHODS, MethodSpec, Site, method_spec
from peftjax.peft.variables import TRAINABLE, Adapter, FrozenAdapter, PeftParam, trainable_filter

__all__ = ["METHODS", "TRAINABLE", "Adapter", "FrozenAdapter", "MethodSpec", "PeftConfig",
           "PeftParam", "Site", "apply_peft", "method_spec", "module_paths", "trainable_filter"]
