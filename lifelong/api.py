"""The library's verbs in one place, for programs that drive lifelong without the CLI.

    from lifelong import api
    api.init("stores/x.h5", model="smollm2-135m")
    report = api.push("stores/x.h5", "batch_042.jsonl")
    api.rollback("stores/x.h5", to=41)

Each verb lives in `lifelong.ops` and is re-exported here unchanged; this module imports
torch (through the verbs), the read-only ones in `lifelong.ops.audit` do not.
"""
from __future__ import annotations

from lifelong.ops.ask import complete
from lifelong.ops.audit import log_rows, migrate, show, status
from lifelong.ops.evaluate import evaluate, live_facts
from lifelong.ops.export import export
from lifelong.ops.init import init
from lifelong.ops.locate import locate
from lifelong.ops.push import PushReport, push
from lifelong.ops.refresh import RefreshReport, refresh
from lifelong.ops.rollback import rollback
from lifelong.ops.suggest import suggest
from lifelong.store.location import DEFAULT_STORE, store_path

__all__ = ["init", "push", "PushReport", "rollback", "export", "evaluate", "live_facts", "complete",
           "refresh", "RefreshReport", "locate", "suggest", "log_rows", "show", "status", "migrate", "store_path",
           "DEFAULT_STORE"]
