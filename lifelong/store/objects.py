"""A store's immutable object files (base.h5, batch_NNNNNN.h5): arrays in, arrays out.

Each file is written once, atomically, and never changed; names and values are checked
before anything is written (no NaN/inf, no reserved or nesting names).
"""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from lifelong.errors import StoreError
from lifelong.store import atomic, layout

STR = h5py.string_dtype("utf-8")
ALLOWED_KINDS = "biufcS"  # bool, ints, floats, complex, bytes


def check_arrays(arrays: dict, what: str) -> dict[str, np.ndarray]:
    """Arrays as numpy, with names and values checked. StoreError naming the bad array."""
    if not isinstance(arrays, dict):
        raise StoreError(f"{what}: arrays must be a dict name -> array, not {type(arrays).__name__}")
    out = {}
    for name, a in arrays.items():
        if (not isinstance(name, str) or not name or name.startswith("/") or name.endswith("/")
                or "//" in name or name in (".", "..") or name.split("/")[0] == layout.RESERVED):
            raise StoreError(f"{what}: bad array name {name!r} (use names like 'layer4/P')")
        a = np.asarray(a)
        if a.dtype.kind not in ALLOWED_KINDS:
            raise StoreError(f"{what}: array {name!r} has unsupported dtype {a.dtype}")
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            raise StoreError(f"{what}: array {name!r} has {bad} NaN/inf value(s); nothing was written",
                             hint="the edit diverged; check the optimization settings of the policy")
        out[name] = a
    # A name that is also a prefix of another ("a" and "a/b") cannot exist in HDF5.
    names = set(out)
    for name in out:
        parts = name.split("/")
        for k in range(1, len(parts)):
            if "/".join(parts[:k]) in names:
                raise StoreError(f"{what}: array name {name!r} nests under array {'/'.join(parts[:k])!r}")
    return out


def write_arrays(final: Path, arrays: dict[str, np.ndarray], facts_json: str | None = None) -> None:
    """Write an immutable object file atomically (temp name, fsync, replace). Not compressed."""
    tmp = atomic.temp_name(final)
    try:
        with h5py.File(tmp, "w", locking=False) as f:
            f.attrs["format"] = layout.FORMAT + "/objects"
            for name, a in arrays.items():
                f.create_dataset(name, data=a)
            if facts_json is not None:
                f.create_dataset(layout.FACTS, data=facts_json, dtype=STR)
        atomic.fsync_path(tmp)
        os.replace(tmp, final)
    except BaseException:
        atomic.unlink_quiet(tmp)
        raise


def read_arrays(file: Path, names: list[str] | None, what: str,
                 optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    if not file.is_file():
        raise StoreError(f"{what}: object file {file} is missing; the store is damaged",
                         hint="restore the store (manifest and its .d folder) from a backup")
    try:
        with h5py.File(file, "r", locking=False) as f:
            if names is None:
                found: list[str] = []
                f.visititems(lambda n, o: found.append(n) if isinstance(o, h5py.Dataset) else None)
                names = [n for n in found if n.split("/")[0] != layout.RESERVED]
            missing = [n for n in names if not isinstance(f.get(n), h5py.Dataset)]
            if missing:
                raise StoreError(f"{what}: no array(s) {missing} in {file.name}")
            got = {n: np.asarray(f[n][()]) for n in names}
            got.update({n: np.asarray(f[n][()]) for n in optional if isinstance(f.get(n), h5py.Dataset)})
            return got
    except StoreError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise StoreError(f"{what}: object file {file} is damaged: {first_line(e)}",
                         hint="restore the store from a backup") from e


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
