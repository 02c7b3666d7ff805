"""Reading and perturbing hidden states with forward hooks, and stopping a pass early.

Keys are the inputs of the edited matrix; h^L is the output of decoder layer L (the
residual stream). A pass that only needs layers ≤ l raises `_Stop` in the hook of
the deepest module it reads, so the layers after it are never computed.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


class _Stop(Exception):
    """Raised inside a hook to end a forward pass once everything needed was read."""


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def hooks(model: torch.nn.Module, spec: dict[str, tuple[str, callable]]):
    """Register hooks {module name: ("pre"|"post", fn)}; removed on exit."""
    handles = []
    try:
        for name, (kind, fn) in spec.items():
            module = model.get_submodule(name)
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(fn))
            else:
                handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def run_until(model, ids: torch.Tensor, mask: torch.Tensor, spec: dict, stop: bool = True) -> None:
    """Forward pass with hooks; with stop=True the hooks may raise _Stop to end it."""
    with hooks(model, spec), torch.no_grad():
        try:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        except _Stop:
            if not stop:
                raise


def module_inputs(model, names: list[str], ids, mask, positions: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs of each named module at (row, positions[row]) -> {name: (n, d_in)}.

    The pass stops after the last module in `names` (pass them in forward order).
    """
    out: dict[str, torch.Tensor] = {}
    rows = torch.arange(ids.shape[0], device=ids.device)

    def make(name, last):
        def pre(_module, args):
            x = args[0]  # (n, T, d_in)
            out[name] = x[rows, positions].detach().to(torch.float32)
            if last:
                raise _Stop

        return pre

    spec = {n: ("pre", make(n, i == len(names) - 1)) for i, n in enumerate(names)}
    run_until(model, ids, mask, spec)
    return out


def layer_outputs(model, name: str, ids, mask, positions: torch.Tensor) -> torch.Tensor:
    """Output of decoder layer `name` at (row, positions[row]) -> (n, d_model)."""
    got = {}
    rows = torch.arange(ids.shape[0], device=ids.device)

    def post(_module, _args, output):
        got["h"] = _hidden(output)[rows, positions].detach().to(torch.float32)
        raise _Stop

    run_until(model, ids, mask, {name: ("post", post)})
    return got["h"]


def add_at_positions(delta_fn, positions: torch.Tensor):
    """Post-hook adding delta_fn() (n, d) or (d,) to the layer output at each row's position."""

    def post(_module, _args, output):
        h = _hidden(output)
        rows = torch.arange(h.shape[0], device=h.device)
        d = delta_fn()
        h = h.clone()
        h[rows, positions] = h[rows, positions] + d
        if isinstance(output, tuple):
            return (h,) + tuple(output[1:])
        return h

    return post
