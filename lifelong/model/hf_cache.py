"""The keyword and output field that carry a key/value cache, whichever transformers is installed.

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
