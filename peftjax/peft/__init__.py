"""Parameter-efficient fine-tuning modules and how they attach to a base model."""

from peftjax.peft.bottleneck import BottleneckAdapter
from peftjax.peft.inject import DEFAULT_TARGETS, METHODS, PeftConfig, apply_peft, module_paths
from peftjax.peft.lora import LoRADense
from peftjax.peft.variables import TRAINABLE, Adapter, PeftParam, trainable_filter

__all__ = ["DEFAULT_TARGETS", "METHODS", "TRAINABLE", "Adapter", "BottleneckAdapter",
           "LoRADense", "PeftConfig", "PeftParam", "apply_peft", "module_paths",
           "trainable_filter"]
