"""The KV cache argument of a transformers forward pass, under the name this transformers version uses."""

from __future__ import annotations

import inspect


def cache_kwarg(model) -> str:
    """transformers 5.2x renamed `past_key_values` to `cache` (the old name still works, with a warning)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def returned_cache(result, name: str):
    """The KV cache a forward pass with use_cache=True returned, under either name."""
    return result[name] if name in result else result.past_key_values
