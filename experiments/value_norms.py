"""How long a δ each value optimizer needs to reach its target, on real CounterFact facts.

For the first N CounterFact dev facts (one group each) and each variant (policy overrides),
optimizes δ with the fast value loop on the store's base model and reports the median
‖δ‖/‖h^L‖, the mean steps and how many reached the early stop. A δ is the residual the
update writes, so a shorter one for the same target is a smaller weight change.

    python experiments/value_norms.py STORE [--facts 20]

STORE: any store made with `lifelong init` for smollm2-135m (its base weights and
contexts are used; nothing is written to it). Writes experiments/reports/value_norms.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # ../bench: benchdata.py, quality.py
from quality import counterfact_batches  # noqa: E402

REPORTS = Path(__file__).parent / "reports"

VARIANTS = {
    "Adam lr 1.0 (shipped)": {"optimizer": "adam", "lr": 1.0, "steps": 40},
    "Adam lr 0.25, 80 steps": {"optimizer": "adam", "lr": 0.25, "steps": 80},
    "Adam lr 0.1, 150 steps": {"optimizer": "adam", "lr": 0.1, "steps": 150},
    "normalized, step 0.16‖h‖": {"optimizer": "normalized", "step_size": 0.16, "steps": 40},
    "normalized, step 0.08‖h‖": {"optimizer": "normalized", "step_size": 0.08, "steps": 40},
    "normalized, step 0.04‖h‖": {"optimizer": "normalized", "step_size": 0.04, "steps": 60},
}


def main(argv=None) -> None:
    from lifelong.edit.batch import layer_name
    from lifelong.facts import Fact
    from lifelong.model.session import Session
    from lifelong.store.store import Store
    from lifelong.edit.values import reached_stop
    from lifelong.edit.values_fast import optimize_value_fast

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("--facts", type=int, default=20)
    ap.add_argument("--out", default=str(REPORTS / "value_norms.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    session = Session.open(Store.open(args.store), log=lambda *a, **k: None, records=[])
    facts = [Fact.from_dict(d) for d in counterfact_batches(args.facts, args.facts)[0]]
    lines = [f"# Value length per δ optimizer (SmolLM2-135M, first {len(facts)} CounterFact dev facts)", "",
             f"`python experiments/value_norms.py STORE --facts {args.facts}`; one group per fact, the store's policy "
             "with the overrides shown, base weights.", "",
             "| variant | overrides | median ‖δ‖/‖h‖ | mean steps | reached early stop |", "|---|---|---:|---:|---:|"]
    for name, over in VARIANTS.items():
        pol = session.policy.with_overrides(**over)
        out = layer_name(pol.module_template, pol.layers[-1])
        res = [optimize_value_fast(session.model, session.tok, [f], session.contexts, out, pol, None, seed=i)
               for i, f in enumerate(facts)]
        rel = statistics.median(float(r.delta.norm()) / r.h_norm for r in res)
        steps = statistics.mean(r.steps for r in res)
        reached = sum(reached_stop(r.nll, r.margin, pol) for r in res)
        lines.append(f"| {name} | `{json.dumps(over)}` | {rel:.2f} | {steps:.1f} | {reached}/{len(res)} |")
        print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
