"""``import oftmerge.peft`` adds ``PeftModel.merge_oft_adapters`` (see :mod:`oftmerge.integrations.peft`)."""

from oftmerge.integrations.peft import live_adapter, merge_oft_adapters

__all__ = ["live_adapter", "merge_oft_adapters"]
