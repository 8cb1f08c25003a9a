"""Interoperability with other libraries' formats: Hugging Face peft adapter directories."""

from peftjax.interop.hf_peft import PeftInteropError, load_peft, read_adapter, save_peft

__all__ = ["PeftInteropError", "load_peft", "read_adapter", "save_peft"]
