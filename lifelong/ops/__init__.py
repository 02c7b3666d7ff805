"""The verbs: init, push, rollback, export, evaluate, ask, refresh, audit (log, show, status), migrate,
and locate (causal tracing of a model, no store).

Each verb (but locate) takes a store path and returns plain data; the CLI (`lifelong.cli`) and the
library facade (`lifelong.api`) only call them. A verb may import every layer below it
(`store`, `model`, `edit`, `eval`); nothing imports `ops` but `api` and `cli`. Verbs
that only read history (`audit`) import no torch, and this package imports none on its own.
"""
from __future__ import annotations


def quiet(*_a, **_k) -> None:
    """The default `log` of every verb: say nothing."""
    return None
