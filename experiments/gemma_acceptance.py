"""The 30-fact acceptance with push-time policy overrides, on a copy of an existing store.

The slow test (`tests/test_real_model.py::test_thirty_facts_in_three_batches`) makes a new
store each run, about 6 minutes on Gemma 3 270M. This script reuses one: it copies STORE,
rolls the copy back to 0, pushes the fact files b1.jsonl … b3.jsonl beside STORE (the three
batches of 10 unknown dev facts the test picks) with OVERRIDES, and measures, as the test does,
strict efficacy and neighbors unchanged on the exported checkpoint against the export `base/`
beside STORE. Prints one ACC line.

    python experiments/gemma_acceptance.py WORK/store.h5 es05 '{"early_stop_loss": 0.5}'
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import copy_store  # noqa: E402
from test_real_model import load_model_plain, neighbor_unchanged  # noqa: E402

from lifelong import api  # noqa: E402
from lifelong.eval.metrics import strict_hits  # noqa: E402
from lifelong.facts import Fact  # noqa: E402
from lifelong.model.prompts import make_row  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", type=Path, help="a store whose folder holds b1.jsonl … b3.jsonl and base/")
    ap.add_argument("name")
    ap.add_argument("overrides", nargs="?", default="{}", help="push-time policy overrides (JSON)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    src, overrides = args.store.parent, json.loads(args.overrides)
    work = src / f"acc_{args.name}"
    shutil.rmtree(work, ignore_errors=True)
    store = copy_store(args.store, work)
    api.rollback(store, 0)
    rows = []
    for i in range(1, 4):
        batch = src / f"b{i}.jsonl"
        report = api.push(store, batch, policy_overrides=overrides)
        print("PUSH", i, json.dumps(report.summary), flush=True)
        rows += [json.loads(line) for line in batch.read_text().splitlines() if line.strip()]
    api.export(store, work / "head")
    base, _ = load_model_plain(src / "base")
    edited, tok = load_model_plain(work / "head")
    facts = [Fact.from_dict(r) for r in rows]
    hits = strict_hits(edited, tok, [make_row(tok, "{}", f.prompt, f.subject, f.target) for f in facts])
    same, total = neighbor_unchanged(base, edited, tok, rows)
    result = {"efficacy": sum(hits) / len(hits), "neighbors_unchanged": same / total, "n_neighbors": total}
    print("ACC", args.name, json.dumps(overrides), json.dumps(result), flush=True)
    shutil.rmtree(work)
    return result


if __name__ == "__main__":
    main()
