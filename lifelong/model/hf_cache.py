"""The keyword and output field that carry a key/value cache, whichever transformers is installed,
and the cache a sampler should pass.

transformers 5 renamed `past_key_values` to `cache` (the old name warns now and goes in 5.40);
4.57, which pyproject still allows, knows only the old one. Asking the module's own signature
keeps one code path for both.
"""
from __future__ import annotations

import functools
import inspect

import torch


def cache_kwarg(module: torch.nn.Module) -> str:
    """Name under which `module.forward` takes a cache."""
    return _kwarg_of(type(module))


@functools.lru_cache(maxsize=None)
def _kwarg_of(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_of(output) -> object:
    """The cache a forward pass with use_cache=True returned."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def preallocated_cache(model: torch.nn.Module, max_len: int) -> object | None:
    """A key/value cache written in place up to max_len positions (transformers' StaticCache),
    or None (the model's own growing cache) where this transformers or model has none.
    The growing cache concatenates all earlier keys and values at every step: sampling 128
    tokens for 157 rows spent a third of Gemma 3's time copying them."""
    try:
        from transformers.cache_utils import StaticCache

        return StaticCache(config=model.config, max_cache_len=max_len)
    except (ImportError, TypeError, ValueError, AttributeError, KeyError):
        return None


def last_logits_only(model: torch.nn.Module) -> dict:
    """Keyword that makes a forward pass compute the LM head at the last position only, where
    the model takes one (a 262k-word head on every position costs as much as the layers)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
