"""Every name the store writes on disk, and what each array holds: the schema's one owner.

A store at PATH is the manifest PATH, its object files in PATH.d/ and the writer lock
PATH.lock (`objects_dir`, `batch_file`, `lock_path`). Arrays live in the object files:

    base.h5 (written by init), per edited layer l:
        layer{l}/W          (d_out, d_in) fp32   the base weights of the edited matrix
        layer{l}/mom2       (d_in, d_in)  fp64   C₀ = E[kkᵀ] over the preserved corpus
        layer{l}/P          (d_in, d_in)  fp32   the null-space projector of C₀
        layer{l}/eigvals    (d_in,)       fp64   C₀'s eigenvalues, ascending
      and once:
        residual_fisher     (d_model, d_model)   F summed over the edited layers' outputs
                                                 (policy value_metric fisher only)
    batch_NNNNNN.h5 (written by a push), per edited layer l:
        layer{l}/A, layer{l}/B   (d_out, r), (r, d_in)   Δ = A·B
        layer{l}/K               (u, d_in)   the keys written, one row per write unit (fact)
      and once:
        bank/keys           (n, d_in)     each group's key at the last edited layer
        bank/deltas         (n, d_model)  each group's optimized residual δ
        units/group         (u,)          the group of each write unit (format 3; a batch
                                          without it has one unit per group)
        _lifelong/facts     the batch's full fact dicts, one JSON string (reserved group)

Format versions: 3 lets a batch's K hold a row per fact (units/group); 2 computes head
weights as base + ΣAB rounded to fp32 once (1: after each batch). `migrations` upgrades.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

FORMAT = "lifelong-store"
FORMAT_VERSION = 3
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
RESERVED = "_lifelong"          # group in object files for lifelong's own data; not an array name
FACTS = RESERVED + "/facts"     # a batch's full fact dicts, one JSON string

BASE_FILE = "base.h5"
FISHER = "residual_fisher"
BANK_KEYS, BANK_DELTAS = "bank/keys", "bank/deltas"
UNITS = "units/group"


def layer_key(layer: int, what: str) -> str:
    """Array name of a per-layer array: layer_key(4, "W") -> 'layer4/W'."""
    return f"layer{layer}/{what}"


def key_rows(arrays: dict, groups) -> np.ndarray:
    """Rows of a batch's K that belong to `groups` (indices into the batch's groups):
    `arrays` as read with optional=(UNITS,); batches stored before units have a row per group."""
    return np.isin(arrays[UNITS], groups) if UNITS in arrays else np.asarray(groups, dtype=np.int64)


def objects_dir(path: Path) -> Path:
    return path.with_name(path.name + ".d")


def batch_file(path: Path, batch_id: int) -> Path:
    return objects_dir(path) / f"batch_{batch_id:06d}.h5"


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")
