"""Quality over a long edit sequence: how fast a deployment decays, in numbers per 100 edits.

Pushes CounterFact dev facts in BATCHES × SIZE (default 40 × 50 = 2000 edits) into a fresh
store (the model's shipped policy with --push/--init overrides) and every EVERY batches
(default 5) measures, as bench/quality_quick.py does, bare strict efficacy, paraphrase,
neighbors unchanged (all, and those the base model was sure of), retention of batch 1 and
perplexity drift on WikiText-2 test and on the store's sampled held-out text. Facts are
scored on a fixed sample (all of batch 1 and a seeded draw of the other live facts, up to
--sample) so that an evaluation at 2000 edits costs what one at 400 does.

Resumable: a run that is stopped or killed goes on from the store's last landed batch when
started again with the same arguments (the store survives a kill at any moment). Results
go to bench/reports/long_horizon.json after every batch; the report (table, slopes per 100
edits, a PNG of every metric against edits) is rebuilt after every evaluation.

    python bench/long_horizon.py shipped
    python bench/long_horizon.py frobenius2 --push '{"frobenius_weight": 2}'
    python bench/long_horizon.py shipped-500 --batches 10
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import torch

from benchdata import REPORTS, WORK
from quality import counterfact_batches, write_batch
from quality_quick import describe, fresh_store, measure, run_arguments, slope

METRICS = [("efficacy", "efficacy"), ("paraphrase", "paraphrase"), ("neighbors_unchanged", "neighbors unchanged"),
           ("neighbors_unchanged_sure", "neighbors unchanged (base sure)"), ("retention_batch1", "retention of batch 1"),
           ("drift_wikitext", "drift WikiText"), ("drift_sampled", "drift sampled text")]


def sampler(n: int, seed: int = 0):
    """A pick(facts, origin) -> indices: every fact of the first batch, and a seeded draw of the
    rest up to n in all (the same draw for the same live set)."""
    def pick(_facts, origin: list[int]) -> list[int]:
        first = min(origin)
        ones = [i for i, o in enumerate(origin) if o == first]
        rest = [i for i, o in enumerate(origin) if o != first]
        k = max(0, min(len(rest), n - len(ones)))
        return sorted(ones + random.Random(seed).sample(rest, k))
    return pick


def landed(store: Path) -> int:
    """How many batches the store holds (0 when there is none)."""
    from lifelong.store.store import Store

    return len(Store.open(store).records) if store.exists() else 0


def run(args) -> None:
    from lifelong import api
    from lifelong.policy import find_policy, load_policy

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    push_over, init_over = json.loads(args.push), json.loads(args.init)
    results = load(out)
    config = {"push": push_over, "init": init_over, "size": args.size, "model": args.model, "policy": args.policy,
              "sample": args.sample}
    store = work / f"{args.name}.h5"
    done = landed(store)
    entry = results.get(args.name)
    if done and (entry is None or {k: entry.get(k) for k in config} != config):
        raise SystemExit(f"{store} holds {done} batches of another run; pick another name or remove it")
    if not done:
        store = fresh_store(work, args.name, init_over, args.model, args.policy)
        entry = {**config, "base": describe(load_policy(find_policy(args.policy or args.model))), "rows": []}
    entry["rows"] = [r for r in entry["rows"] if r["edits"] <= done * args.size]
    batches = counterfact_batches(args.size * args.batches, args.size)
    wiki, base_ppl, pick = None, {}, sampler(args.sample)
    for i in range(len(batches)):
        edits = args.size * (i + 1)
        row = next((r for r in entry["rows"] if r["edits"] == edits), None)
        if i >= done:
            t = time.perf_counter()
            rep = api.push(store, write_batch(work / f"{args.name}-b{i + 1}.jsonl", batches[i]),
                           policy_overrides=push_over)
            row = {"edits": edits, "push_seconds": round(time.perf_counter() - t, 1),
                   "steps": rep.mean_steps,
                   "written": sum(g.get("written", True) for g in rep.groups) / len(rep.groups)}
            entry["rows"].append(row)
        elif row is None:                              # landed, but a kill took its row
            row = {"edits": edits, "push_seconds": None, "steps": None, "written": None}
            entry["rows"] = sorted(entry["rows"] + [row], key=lambda r: r["edits"])
        due = wants_eval(i, args, len(batches)) and "efficacy" not in row
        if i < done and not due:
            continue
        if due:
            t = time.perf_counter()
            m, wiki = measure(store, wiki, base_ppl, pick=pick)
            row.update(m, eval_seconds=round(time.perf_counter() - t, 1))
        print(args.name, json.dumps(row), flush=True)
        results = load(out)                           # parallel runs keep each other's rows
        results[args.name] = entry
        save(out, results, plot="efficacy" in row)


def wants_eval(i: int, args, n: int) -> bool:
    return (i + 1) % args.every == 0 or i + 1 == n


def load(out: Path) -> dict:
    path = out.with_suffix(".json")
    return json.loads(path.read_text()) if path.exists() else {}


def save(out: Path, results: dict, plot: bool) -> None:
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    if plot:
        write_report(results, out)


def slopes(rows: list[dict], upto: int | None = None) -> dict[str, float] | None:
    """Per 100 edits, least-squares over the measured rows (up to `upto` edits): drift,
    neighbors unchanged and efficacy."""
    rows = [r for r in rows if "efficacy" in r and (upto is None or r["edits"] <= upto)]
    if len(rows) < 2:
        return None
    xs = [r["edits"] / 100 for r in rows]
    return {k: slope(xs, [r[k] for r in rows]) for k in ("drift_wikitext", "neighbors_unchanged", "efficacy")}


def doubling(rows: list[dict]) -> float | None:
    """Edits over which WikiText drift doubles: a line through ln(drift) of the measured rows
    (drift grows faster than linearly over a long sequence)."""
    rows = [r for r in rows if "efficacy" in r and r["drift_wikitext"] > 0]
    if len(rows) < 2:
        return None
    k = slope([r["edits"] for r in rows], [math.log(r["drift_wikitext"]) for r in rows])
    return math.log(2) / k if k > 0 else None


def crossing(rows: list[dict], level: float) -> float | None:
    """Edits at which WikiText drift first reaches `level`, on straight lines between the
    measured rows and from (0 edits, 0 drift); None if no row reaches it."""
    points = [(0, 0.0)] + [(r["edits"], r["drift_wikitext"]) for r in rows if "efficacy" in r]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y1 >= level:
            return x0 + (x1 - x0) * (level - y0) / (y1 - y0) if y1 > y0 else x1
    return None


def per_fact(row: dict, size: int) -> str:
    return "—" if row.get("push_seconds") is None else f"{row['push_seconds'] / size:.2f}"


def write_report(results: dict, out: Path) -> None:
    def pct(v, sign=""):
        return "—" if v is None else format(v, f"{sign}.1%")

    lines = ["# Long-horizon quality (CounterFact dev, sequential batches)", "",
             "`python bench/long_horizon.py NAME [--push JSON] [--init JSON] [--batches N]` per variant (see the",
             "script's docstring). Facts are scored on a fixed sample (all of batch 1 and a seeded draw of the",
             "other live facts); drift is perplexity against the base model on WikiText-2 test (64 × 128",
             "tokens) and on the store's model-sampled held-out text.", "",
             "| variant | base policy | overrides | edits | efficacy | paraphrase | neighbors unchanged | "
             "of those the base was sure of | retention b1 | drift WikiText | drift sampled | written | push s/fact |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        over = json.dumps({**r["push"], **r["init"]}) if (r["push"] or r["init"]) else "—"
        for row in r["rows"]:
            if "efficacy" in row:
                lines.append(f"| {name} | {r['base']} | `{over}` | {row['edits']} | {pct(row['efficacy'])} | "
                             f"{pct(row['paraphrase'])} | {pct(row['neighbors_unchanged'])} | "
                             f"{pct(row.get('neighbors_unchanged_sure'))} | {pct(row['retention_batch1'])} | "
                             f"{pct(row['drift_wikitext'], '+')} | {pct(row['drift_sampled'], '+')} | "
                             f"{pct(row.get('written'))} | {per_fact(row, r['size'])} |")
    lines += ["", "## How fast it decays", "",
              "Least-squares slopes per 100 edits over the measured rows up to 500 edits and over all of them; "
              "the edits over which WikiText drift doubles (a line through its logarithm); and where it passes "
              "+5 % (the shipped gate `max_perplexity_drift`) and +10 %, between measured rows.", "",
              "| variant | measured at | drift / 100 (to 500) | neighbors / 100 (to 500) | efficacy / 100 (to 500) | "
              "drift / 100 (all) | drift doubles every | drift +5 % at | drift +10 % at |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def num(v, fmt):
        return "—" if v is None else format(v, fmt)

    for name, r in results.items():
        early, every = slopes(r["rows"], 500), slopes(r["rows"])
        if every:
            at = ", ".join(str(row["edits"]) for row in r["rows"] if "efficacy" in row)
            e = early or {}
            lines.append(f"| {name} | {at} | {num(e.get('drift_wikitext'), '+.2%')} | "
                         f"{num(e.get('neighbors_unchanged'), '+.2%')} | {num(e.get('efficacy'), '+.2%')} | "
                         f"{every['drift_wikitext']:+.2%} | {num(doubling(r['rows']), '.0f')} | "
                         f"{num(crossing(r['rows'], 0.05), '.0f')} | {num(crossing(r['rows'], 0.10), '.0f')} |")
    png = out.with_suffix(".png")
    plot(results, png)
    lines += ["", f"![every metric against edits]({png.name})", "",
              f"Device: CPU, {os.cpu_count()} cores; runs may share it, so push seconds compare only roughly.", ""]
    out.write_text("\n".join(lines) + "\n")


def plot(results: dict, png: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 7))
    FigureCanvasAgg(fig)
    for k, (key, title) in enumerate(METRICS):
        ax = fig.add_subplot(2, 4, k + 1)
        for name, r in results.items():
            rows = [row for row in r["rows"] if row.get(key) is not None]
            ax.plot([row["edits"] for row in rows], [row[key] for row in rows], marker="o", ms=3, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("edits", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run_arguments(ap, batches=40, work=str(WORK / "long_horizon"), out=REPORTS / "long_horizon.md")
    ap.add_argument("--every", type=int, default=5, help="evaluate every this many batches (and after the last)")
    ap.add_argument("--sample", type=int, default=400, help="live facts scored per evaluation")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
