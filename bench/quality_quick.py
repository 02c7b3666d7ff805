"""A quick read of a policy change on CounterFact: fewer edits and cheaper metrics than quality.py.

Pushes the first BATCHES × SIZE (default 50) CounterFact dev facts into a fresh store (the
model's shipped policy, or --policy FILE, with --push/--init overrides) and, every second batch
and after the last,
measures every live fact's bare strict efficacy and paraphrase, neighbors unchanged vs the
base model, retention of batch 1, and perplexity drift on two texts: the first 400 lines of
WikiText-2 test (64 × 128 tokens, never seen by init's corpus) and the store's model-sampled
held-out text. No prefixed efficacy and no fluency: one variant to 200 edits takes ~10 min
on this 2-core CPU, against ~40 for quality.py. Results append to bench/reports/quality_quick.json
and the markdown table beside it is rebuilt.

    python bench/quality_quick.py shipped
    python bench/quality_quick.py margin1 --push '{"stop_margin": 1.0}'
    python bench/quality_quick.py layers1-8 --init '{"layers": [1,2,3,4,5,6,7,8]}'
    python bench/quality_quick.py gemma-shipped --model gemma3-270m --batches 10
    python bench/quality_quick.py suggested --policy policies/suggested.yaml --batches 4 --size 25
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from benchdata import REPORTS, WIKI, WORK, plain_wikitext, wikitext_test_chunks
from quality import counterfact_batches, write_batch

ADAM_ERA = "adam lr 1"   # the rows made before the base policy was written down (until 2026-11-24)


def describe(pol) -> str:
    """The settings of a policy that set how values are optimized and written, in a few words."""
    words = [f"adam lr {pol.values.lr:g}" if pol.values.optimizer == "adam" else f"normalized {pol.values.step_size:g}"]
    words += [f"in the residual Fisher ({pol.preserved.fisher_tokens // 1000}k tokens)"] if pol.values.metric == "fisher" else []
    words += [f"min_realized {pol.update.min_realized:g}"] if pol.update.min_realized > 0 else []
    words += [f"rescale_max {pol.update.rescale_max:g}"] if pol.update.rescale_max > 1 else []
    words += [f"sweeps {pol.experiment.sweeps}"] if pol.experiment.sweeps > 1 else []
    words += [f"C₀ {pol.preserved.corpus_tokens // 1000}k tokens"] if pol.preserved.corpus_tokens != 20000 else []  # 20k until 2026-11-25
    words += [f"init passes {pol.preserved.precision}"] if pol.preserved.precision != "float32" else []  # from 2026-12-07
    # the update; rows before 2026-11-24 (late) left it out: AlphaEdit α 1
    words += ([f"memit λ {pol.update.mom2_weight:g}" + (" holding earlier edits" if pol.update.hold_earlier else "")]
              if not pol.update.project else [f"alphaedit α {pol.update.alpha:g}"])
    return ", ".join(words)


def fresh_store(work: Path, name: str, init_over: dict, model: str = "smollm2-135m",
                policy: str | None = None) -> Path:
    """A new store for this variant: `init` with the policy's init-time overrides, WikiText corpus."""
    import yaml

    from lifelong import api
    from lifelong.policy import find_policy, load_policy

    store = work / f"{name}.h5"
    for p in (store, Path(f"{store}.d"), Path(f"{store}.lock")):
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    pol = load_policy(find_policy(policy or model)).with_overrides(**init_over)
    pol_file = work / f"{name}.policy.yaml"
    pol_file.write_text(yaml.safe_dump(pol.file_data(), sort_keys=False))
    corpus = plain_wikitext(work / "corpus.txt", lines=20_000, src=WIKI)
    api.init(store, model=model, policy=str(pol_file), corpus=str(corpus))
    return store


def measure(store: Path, wiki: list[list[int]] | None, base_ppl: dict, pick=None) -> tuple[dict, list[list[int]]]:
    """Bare strict metrics of every live fact (or of those pick(facts, origin) indexes) and both
    perplexity drifts, at head."""
    from lifelong.api import live_facts
    from lifelong.eval.scoring import base_neighbors, score_facts, summarize
    from lifelong.eval.metrics import perplexity
    from lifelong.model.session import Session
    from lifelong.store.store import Store

    st = Store.open(store)
    s = Session.open(st, log=lambda *a, **k: None)
    if wiki is None:
        wiki = wikitext_test_chunks(s.tok, 64)
    facts, origin = live_facts(st)
    if pick is not None:
        idx = pick(facts, origin)
        facts, origin = [facts[i] for i in idx], [origin[i] for i in idx]
    with s.weights(s.base()):
        base_answers = base_neighbors(s.model, s.tok, facts)
        if not base_ppl:
            base_ppl.update(wiki=perplexity(s.model, wiki), sampled=perplexity(s.model, st.info["heldout"]))
    scores = score_facts(s.model, s.tok, facts, base_answers)
    summary = summarize(scores)
    first = min(origin)
    b1 = [x.efficacy for x, o in zip(scores, origin) if o == first]
    return {"efficacy": summary["efficacy"], "paraphrase": summary["paraphrase"],
            "neighbors_unchanged": summary["neighbors_unchanged"],
            "neighbors_unchanged_sure": summary.get("neighbors_unchanged_sure"), "retention_batch1": sum(b1) / len(b1),
            "drift_wikitext": perplexity(s.model, wiki) / base_ppl["wiki"] - 1,
            "drift_sampled": perplexity(s.model, st.info["heldout"]) / base_ppl["sampled"] - 1}, wiki


def _pct(v) -> str:
    return "—" if v is None else f"{v:.1%}"


def write_table(results: dict, out: Path) -> None:
    lines = ["# Quick quality reads (CounterFact dev; SmolLM2-135M and batches of 50 unless the row says)", "",
             "`python bench/quality_quick.py NAME [--push JSON] [--init JSON]` per row (see the script's",
             "docstring): bare strict metrics of every live fact, WikiText-2 test drift and model-sampled",
             "drift. Each row is one run; compare rows at equal edits. \"Sure\": neighbors unchanged among the",
             "prompts whose base answer had top-1 probability ≥ 0.5 at every target token (rows before",
             "2026-12-06: —). Overrides are against the",
             "model's policy of the time (or the --policy file), summed up in the column \"base policy\".", "",
             "| variant | base policy | overrides | edits | efficacy | paraphrase | neighbors unchanged | of those the base model was sure of | retention b1 "
             "| drift WikiText | drift sampled | steps/group | push s/fact |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        size = r.get("size", 50)
        over = json.dumps({**r["push"], **r["init"]}) if (r["push"] or r["init"]) else "—"
        for row in r["rows"]:
            if "efficacy" not in row:
                continue
            lines.append(f"| {name} | {r.get('base', ADAM_ERA)} | `{over}` | {row['edits']} | {row['efficacy']:.1%} | {row['paraphrase']:.1%} | "
                         f"{row['neighbors_unchanged']:.1%} | {_pct(row.get('neighbors_unchanged_sure'))} | {row['retention_batch1']:.1%} | "
                         f"{row['drift_wikitext']:+.1%} | {row['drift_sampled']:+.1%} | {row['steps']:.1f} | "
                         f"{row['push_seconds'] / size:.2f} |")
    lines += ["", f"Device: CPU, {os.cpu_count()} cores; runs may share it, so push seconds compare only roughly.", ""]
    lines += slope_table(results)
    out.write_text("\n".join(lines) + "\n")


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs (with an intercept)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def slope_table(results: dict, min_edits: int = 300) -> list[str]:
    """Per variant measured to at least min_edits: drift and neighbors per 100 edits, the numbers
    that decide how long a deployment lasts (a line fit over every measured row)."""
    lines = [f"## Slopes (variants measured to at least {min_edits} edits)", "",
             "Least-squares lines over each variant's measured rows, per 100 edits.", "",
             "| variant | base policy | measured at | drift WikiText per 100 edits | neighbors unchanged per 100 edits |",
             "|---|---|---|---:|---:|"]
    for name, r in results.items():
        rows = [row for row in r["rows"] if "efficacy" in row]
        if len(rows) < 2 or rows[-1]["edits"] < min_edits:
            continue
        xs = [row["edits"] / 100 for row in rows]
        lines.append(f"| {name} | {r.get('base', ADAM_ERA)} | {', '.join(str(row['edits']) for row in rows)} | "
                     f"{slope(xs, [row['drift_wikitext'] for row in rows]):+.1%} | "
                     f"{slope(xs, [row['neighbors_unchanged'] for row in rows]):+.1%} |")
    return lines


def run_arguments(ap: argparse.ArgumentParser, batches: int, work: str, out: Path) -> None:
    """The arguments of a run of sequential CounterFact batches (this script's and long_horizon's)."""
    ap.add_argument("name")
    ap.add_argument("--push", default="{}", help="push-time policy overrides (JSON)")
    ap.add_argument("--init", default="{}", help="init-time policy overrides (JSON), e.g. layers")
    ap.add_argument("--batches", type=int, default=batches)
    ap.add_argument("--size", type=int, default=50, help="facts per batch")
    ap.add_argument("--model", default="smollm2-135m", help="a built-in model (or a model directory with --policy)")
    ap.add_argument("--policy", default=None, help="a policy file (default: the model's shipped one)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=work)
    ap.add_argument("--out", default=str(out))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run_arguments(ap, batches=4, work=str(WORK / "quality_quick"), out=REPORTS / "quality_quick.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lifelong import api

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    push_over, init_over = json.loads(args.push), json.loads(args.init)
    store = fresh_store(work, args.name, init_over, args.model, args.policy)
    from lifelong.policy import find_policy, load_policy

    base = describe(load_policy(find_policy(args.policy or args.model)))
    if args.model != "smollm2-135m" or args.policy:
        base = f"{args.model}: {Path(args.policy).name + ': ' if args.policy else ''}{base}"
    rows, wiki, base_ppl = [], None, {}
    batches = counterfact_batches(args.size * args.batches, args.size)
    for i, batch in enumerate(batches):
        t = time.perf_counter()
        rep = api.push(store, write_batch(work / f"{args.name}-b{i + 1}.jsonl", batch), policy_overrides=push_over)
        row = {"edits": args.size * (i + 1), "push_seconds": time.perf_counter() - t,
               "steps": rep.mean_steps}
        if (i + 1) % 2 == 0 or i + 1 == len(batches):
            m, wiki = measure(store, wiki, base_ppl)
            row.update(m)
        rows.append(row)
        print(args.name, json.dumps(row), flush=True)
        if "efficacy" in row:   # after every measurement: a long run stopped early keeps what it measured
            save(Path(args.out), args.name, {"push": push_over, "init": init_over, "rows": rows, "base": base,
                                             "size": args.size})


def save(out: Path, name: str, entry: dict) -> None:
    """Put this variant's rows into the JSON (re-read, so parallel runs keep each other's) and
    rebuild the table."""
    out_json = out.with_suffix(".json")
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    results[name] = entry
    out_json.write_text(json.dumps(results, indent=1))
    write_table(results, out)


if __name__ == "__main__":
    main()
