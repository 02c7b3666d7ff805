"""Where a store lives when the user does not say: --store, else $LIFELONG_STORE, else stores/default.h5."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_STORE = Path("stores") / "default.h5"


def store_path(path: str | os.PathLike | None = None) -> Path:
    """--store, else $LIFELONG_STORE, else stores/default.h5."""
    return Path(path or os.environ.get("LIFELONG_STORE") or DEFAULT_STORE)
