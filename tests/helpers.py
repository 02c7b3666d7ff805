"""Helpers shared by the CLI-level test modules."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from lifelong.cli import main


def cli(*args, code: int = 0, env: dict | None = None):
    """Run `lifelong ARGS` in-process; assert the exit code; return the click Result."""
    res = CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)
    assert res.exit_code == code, (
        f"`lifelong {' '.join(map(str, args))}` exited {res.exit_code}, expected {code}\n"
        f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}")
    return res


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_store(src: Path, dst_dir: Path) -> Path:
    """A private copy of a store: the manifest PATH and the folder PATH.d (not the lock file)."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / src.name
    shutil.copy2(src, dst)
    shutil.copytree(src.with_name(src.name + ".d"), dst.with_name(dst.name + ".d"))
    return dst


# ROME known-facts records of what the tiny models learned from conftest.TEXT
KNOWN = [
    {"known_id": 0, "subject": "France", "attribute": "Paris", "template": "The capital of {} is",
     "prediction": " Paris.", "prompt": "The capital of France is", "relation_id": "P36"},
    {"known_id": 1, "subject": "Danielle Darrieux", "attribute": "French",
     "prompt": "The mother tongue of Danielle Darrieux is", "relation_id": "P103"},
    {"known_id": 2, "subject": "Toko Yasuda", "attribute": "guitar", "prompt": "Toko Yasuda plays the"},
    {"known_id": 3, "subject": "Brazil", "attribute": "Portuguese", "prompt": "The official language of Brazil is"},
]
WRONG = {"subject": "France", "attribute": "Tokyo", "prompt": "The capital of France is"}
