"""Edit quality at lifelong scale: sequential pushes, evaluation after each, ablations side by side.

    python bench/quality.py                       # bench/reports/quality.md (GPU: minutes; a 2-core CPU: hours)
    python bench/quality.py --work bench/work/quality_cpu10 --out bench/reports/quality_cpu10.md --jobs 2
                                                  # the committed report (2-core CPU, 2026-12-05: 4.5 hours)
    python bench/quality.py --n 40 --batch 10 --variants full,no_align --scenarios counterfact

Scenarios (data from ../shared/data, or $LIFELONG_BENCH_DATA; never needed by the product itself):
  counterfact   CounterFact dev, first N facts, pushed in batches
  same_subject  counterfact_same_subject.jsonl, first 200 lines, batches of 50; a batch may
                hold one value per subject and relation, so where the file asks for several
                inside one batch the last one is kept (what supersession does across batches)
  supersession  subjects with several facts: a fact edited, then edited again to a third value
                two batches later, between filler batches; does the newest value win, and do
                the subject's other facts survive?
Variants are policy switches on the shipped smollm2-135m policy (full = alignment and merging
on, with the shipped update; projection off = MEMIT as published; alphaedit = the projected
update without alignment or merging). Each (scenario, variant) runs in its own copy of one `init`ed store, in
its own process (--jobs). Per-batch results go to WORK/<scenario>-<variant>.json as they
come, so a killed run resumes where it stopped; the report is rebuilt from those files.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from benchdata import REPORTS, SHARED, WIKI_TEST, WORK, plain_wikitext

DEV = SHARED / "counterfact" / "counterfact_dev_3000.jsonl"
SAME = SHARED / "counterfact" / "counterfact_same_subject.jsonl"

VARIANTS = {  # name -> (label, push-time policy overrides[, init-time policy overrides])
    "full": ("full (alignment + merging + the shipped update)", {"align": True, "merge_same_subject": True}),
    "no_align": ("alignment off", {"align": False}),
    "no_merge": ("merging off", {"merge_same_subject": False}),
    "no_project": ("projection off (MEMIT update: λ 2000, earlier edits not held)",
                   {"project": False, "hold_earlier": False, "mom2_weight": 2000.0}),
    "projected": ("the projected update (AlphaEdit's) with the shipped values", {"project": True}),
    "alphaedit": ("neither alignment nor merging (AlphaEdit)", {"align": False, "merge_same_subject": False,
                                                                "project": True}),
    "shipped": ("the shipped policy as it is", {}),
    # tuning candidates, kept beside the ablations so their effect is measured in the same run
    # (those of α, the threshold and λ_p are settings of the projected update)
    "full_alpha10": ("full, α 10 (published)", {"align": True, "alpha": 10.0, "project": True}),
    "full_clamp075": ("full, ‖δ‖ clamp 0.75·‖h‖", {"align": True, "clamp_norm_factor": 0.75}),
    "full_lr05": ("full, lr 0.5, weight decay 0.5", {"align": True, "lr": 0.5, "weight_decay": 0.5}),
    "full_t5e3": ("full, null-space threshold 5e-3, corpus 100k tokens",
                  {"align": True, "project": True}, {"nullspace_threshold": 5e-3, "corpus_tokens": 100_000}),
    "combo": ("alignment off, α 10, lr 0.5, weight decay 0.5", {"align": False, "project": True, "alpha": 10.0, "lr": 0.5,
                                                                 "weight_decay": 0.5}),
    "preserve2000": ("alignment off, λ_p 2000 (P·C₀ in the solve)", {"align": False, "project": True, "preserve_weight": 2000.0}),
    "preserve500": ("alignment off, λ_p 500 (P·C₀ in the solve)", {"align": False, "project": True, "preserve_weight": 500.0}),
    "full_c100k": ("full, corpus 100k tokens", {"align": True}, {"corpus_tokens": 100_000}),
    "margin1": ("alignment off, stop at a 1-nat argmax margin (stop_margin 1)", {"align": False, "stop_margin": 1.0}),
    "memit10": ("the shipped policy with λ 10 (writes more of each residual against a 200k-token C₀)",
                {"mom2_weight": 10.0}),
    "euclidean": ("the shipped policy with δ stepped in ‖δ‖, not in the residual Fisher",
                  {"value_metric": "euclidean"}),
}
SCENARIO_VARIANTS = {
    "counterfact": ["shipped", "full", "no_align", "no_merge", "no_project", "projected", "alphaedit"],
    "tuning": ["full_alpha10", "full_clamp075", "full_lr05", "full_t5e3", "full_c100k", "combo", "preserve2000", "preserve500", "margin1", "memit10", "euclidean"],
    "same_subject": ["shipped", "full", "no_merge"],
    "supersession": ["shipped", "full"],
}
METRICS = ["efficacy", "prefixed", "paraphrase", "neighbors_unchanged", "perplexity_drift", "fluency"]
TARGETS = {  # DESIGN/issue targets for the counterfact scenario, at the end
    "efficacy": (">=", 0.97), "prefixed": (">=", 0.93), "paraphrase": (">=", 0.65),
    "neighbors_unchanged": (">=", 0.90), "retention_batch1": (">=", 0.97), "perplexity_drift": ("<=", 0.02),
}


# ----------------------------------------------------------------------------- data


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _relation(r: dict) -> str:
    return r.get("relation") or r["prompt"]


def keep_last_per_relation(rows: list[dict]) -> tuple[list[dict], int]:
    """One fact per (subject, relation) in a batch: the last one asked for."""
    last = {(r["subject"], _relation(r)): i for i, r in enumerate(rows)}
    kept = [r for i, r in enumerate(rows) if last[(r["subject"], _relation(r))] == i]
    return kept, len(rows) - len(kept)


def counterfact_batches(n: int, batch: int) -> list[list[dict]]:
    rows = _rows(DEV)[:n]
    return [keep_last_per_relation(rows[i:i + batch])[0] for i in range(0, len(rows), batch)]


def same_subject_batches(n: int, batch: int) -> tuple[list[list[dict]], int]:
    rows = _rows(SAME)[:n]
    out, dropped = [], 0
    for i in range(0, len(rows), batch):
        kept, d = keep_last_per_relation(rows[i:i + batch])
        out.append(kept)
        dropped += d
    return out, dropped


def supersession_batches(subjects: int = 5, size: int = 20) -> tuple[list[list[dict]], list[dict]]:
    """Batch 1: per subject a fact (p1 -> A) and another fact (p2 -> B); batch 3: (p1 -> C).
    Filler from dev lines 2000+ (apart from the counterfact scenario's)."""
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for r in _rows(SAME)[400:]:
        by_subject[r["subject"]].append(r)
    cases = []
    for subject, rs in by_subject.items():
        by_prompt: dict[str, list[dict]] = defaultdict(list)
        for r in rs:
            by_prompt[r["prompt"]].append(r)
        twice = [p for p, v in by_prompt.items() if len({x["target"] for x in v}) >= 2]
        other = [v[0] for p, v in by_prompt.items() if p not in twice]
        if twice and other:
            first, third = by_prompt[twice[0]][0], next(x for x in by_prompt[twice[0]][1:]
                                                        if x["target"] != by_prompt[twice[0]][0]["target"])
            cases.append({"subject": subject, "first": first, "other": other[0], "third": third})
        if len(cases) == subjects:
            break
    filler = iter(_rows(DEV)[2000:])
    fill = lambda k: [next(filler) for _ in range(k)]  # noqa: E731
    b1 = [c["first"] for c in cases] + [c["other"] for c in cases]
    b3 = [c["third"] for c in cases]
    return [b1 + fill(size - len(b1)), fill(size), b3 + fill(size - len(b3))], cases


# ----------------------------------------------------------------------------- one run


def push_overrides(variant: str) -> dict:
    return VARIANTS[variant][1]


def init_overrides(variant: str) -> dict:
    return VARIANTS[variant][2] if len(VARIANTS[variant]) > 2 else {}


def init_name(variant: str) -> str:
    return init_name_of(init_overrides(variant))


def write_batch(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def scenario_batches(scenario: str, args) -> tuple[list[list[dict]], dict]:
    if scenario in ("counterfact", "tuning"):
        return counterfact_batches(args.n, args.batch), {}
    if scenario == "same_subject":
        batches, dropped = same_subject_batches(args.same_n, args.same_batch)
        return batches, {"dropped_inside_batches": dropped}
    batches, cases = supersession_batches()
    return batches, {"cases": cases}


def run_one(scenario: str, variant: str, work: Path, args) -> dict:
    """Push the scenario's batches one by one into a copy of the init store, evaluating after each."""
    from lifelong import api
    from lifelong.store import history
    from lifelong.store.store import Store

    out = work / f"{scenario}-{variant}.json"
    store = work / f"{scenario}-{variant}.h5"
    done = json.loads(out.read_text()) if out.exists() else None
    batches, extra = scenario_batches(scenario, args)
    if done is None:
        for p in (store, Path(f"{store}.d"), Path(f"{store}.lock")):
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        init = work / f"{init_name(variant)}.h5"
        shutil.copy(init, store)
        shutil.copytree(f"{init}.d", f"{store}.d")
        done = {"scenario": scenario, "variant": variant, "device": device_name(), "overrides": push_overrides(variant),
                "init_overrides": init_overrides(variant), "batches": [], **extra,
                "heldout": Store.open(store).info.get("heldout_source", "model-sampled text")}
    last = done["batches"][-1]["batch_id"] if done["batches"] else 0
    if history.head(Store.open(store).records) != last:  # killed between a push and its evaluation
        api.rollback(store, to=last)                     # redo that batch
    for i in range(len(done["batches"]), len(batches)):
        path = write_batch(work / f"{scenario}-{variant}-b{i + 1}.jsonl", batches[i])
        rep = api.push(store, path, policy_overrides=push_overrides(variant))
        res = api.evaluate(store, prefixes=args.prefixes)
        facts = res["facts"]
        first_id = done["batches"][0]["batch_id"] if done["batches"] else rep.batch_id
        row = {
            "batch": i + 1, "batch_id": rep.batch_id, "edits": sum(len(b) for b in batches[:i + 1]), "live_facts": len(facts),
            "push_seconds": rep.timings["total"], "push_efficacy": rep.summary["efficacy"],
            "timings": rep.timings, **{k: res["summary"].get(k) for k in METRICS + ["perplexity", "neighbors_true"]},
            "retention_batch1": _mean([f["efficacy"] for f in facts if f["batch"] == first_id]),
            "groups": len(rep.groups), "steps_mean": _mean([g["steps"] for g in rep.groups]),
        }
        if scenario == "supersession":
            row["supersession"] = supersession_check(store, done["cases"])
        done["batches"].append(row)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(done, indent=1))
        os.replace(tmp, out)
        print(f"{scenario}/{variant} batch {i + 1}: " + ", ".join(
            f"{k} {row[k]:.3f}" for k in ["efficacy", "neighbors_unchanged", "perplexity_drift"] if row[k] is not None),
            flush=True)
    return done


def supersession_check(store: Path, cases: list[dict]) -> dict:
    """Per case: does p1 give the newest value, no longer the first, and does the other fact hold?"""
    from lifelong import api

    tmp = store.parent / (store.stem + "-probe.jsonl")
    probes = []
    for c in cases:
        probes += [c["third"], {**c["first"], "relation": "probe-first"}, c["other"]]
    write_batch(tmp, [{k: p[k] for k in ("subject", "prompt", "target")} | {"relation": f"{i}"}
                      for i, p in enumerate(probes)])
    res = api.evaluate(store, tmp, prefixes=0)["facts"]
    third = [res[3 * j]["efficacy"] for j in range(len(cases))]
    first = [res[3 * j + 1]["efficacy"] for j in range(len(cases))]
    other = [res[3 * j + 2]["efficacy"] for j in range(len(cases))]
    return {"newest_wins": _mean(third), "first_value_gone": _mean([not f for f in first]),
            "other_facts_hold": _mean(other)}


def _mean(xs) -> float | None:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# ----------------------------------------------------------------------------- driver


def ensure_init(work: Path, overrides: dict) -> None:
    """One `init`ed store per set of init-time policy overrides, copied by every run that uses it."""
    name = init_name_of(overrides)
    if (work / f"{name}.h5").exists():
        return
    import yaml

    from lifelong import api
    from lifelong.policy import find_policy, load_policy

    t = time.perf_counter()
    pol = load_policy(find_policy("smollm2-135m")).with_overrides(**overrides)
    pol_file = work / f"{name}.policy.yaml"
    pol_file.write_text(yaml.safe_dump(pol.file_data(), sort_keys=False))
    staging = work / f"{name}.staging.h5"
    for p in (staging, Path(f"{staging}.d"), Path(f"{staging}.lock")):
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    api.init(staging, model="smollm2-135m", policy=str(pol_file),
             corpus=str(plain_wikitext(work / "corpus.txt", lines=20_000)),
             heldout=str(plain_wikitext(work / "heldout.txt", lines=400, src=WIKI_TEST)), log=print)
    os.replace(f"{staging}.d", work / f"{name}.h5.d")
    os.replace(staging, work / f"{name}.h5")
    (work / f"{name}.seconds.txt").write_text(f"{time.perf_counter() - t:.1f}\n")


def shared_runs(runs) -> dict:
    """(scenario, variant) -> the earlier run of the same scenario whose variant comes to the
    same policy (e.g. alignment off when the shipped policy has it off): run once, reported twice."""
    from lifelong.policy import find_policy, load_policy

    shipped = load_policy(find_policy("smollm2-135m"))
    first, alias = {}, {}
    for s, v in runs:
        pol = shipped.with_overrides(**init_overrides(v), **push_overrides(v))
        key = (s, init_name(v), pol.stored_json())
        if key in first:
            alias[(s, v)] = first[key]
        else:
            first[key] = (s, v)
    return alias


def init_name_of(overrides: dict) -> str:
    return "init" + "".join(f"-{k}{v:g}" for k, v in sorted(overrides.items()))


def device_name() -> str:
    import torch

    if torch.cuda.is_available() and os.environ.get("LIFELONG_DEVICE", "cuda") != "cpu":
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(WORK / "quality"), help="stores and per-run results (resumable)")
    ap.add_argument("--out", default=str(REPORTS / "quality.md"))
    ap.add_argument("--scenarios", default="counterfact,same_subject,supersession")
    ap.add_argument("--variants", default=None, help="comma list; default: each scenario's own set")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--same-n", type=int, default=200)
    ap.add_argument("--same-batch", type=int, default=50)
    ap.add_argument("--prefixes", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (one process each)")
    ap.add_argument("--worker", nargs=2, metavar=("SCENARIO", "VARIANT"), help=argparse.SUPPRESS)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds: then stop the runs (they resume next time) and write the report")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.worker:
        run_one(*args.worker, work, args)
        return
    runs = [(s, v) for s in args.scenarios.split(",")
            for v in (args.variants.split(",") if args.variants else SCENARIO_VARIANTS[s])]
    alias = shared_runs(runs)
    if not args.report_only:
        for ov in {json.dumps(init_overrides(v), sort_keys=True) for _, v in runs}:
            ensure_init(work, json.loads(ov))
        run_parallel([r for r in runs if r not in alias], work, args)
    write_report(Path(args.out), work, runs, args, argv if argv is not None else sys.argv[1:], alias)


def run_parallel(runs, work: Path, args) -> None:
    threads = max(1, (os.cpu_count() or 2) // max(1, args.jobs))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    passthrough = ["--n", str(args.n), "--batch", str(args.batch), "--same-n", str(args.same_n),
                   "--same-batch", str(args.same_batch), "--prefixes", str(args.prefixes)]
    pending, live = list(runs), []
    t0 = time.perf_counter()
    while pending or live:
        while pending and len(live) < args.jobs:
            s, v = pending.pop(0)
            log = open(work / f"{s}-{v}.log", "a")
            cmd = [sys.executable, __file__, *passthrough, "--work", str(work), "--worker", s, v]
            live.append(((s, v), subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(2)
        if args.deadline is not None and time.perf_counter() - t0 > args.deadline:
            pending.clear()
            for (s, v), proc, log in live:
                proc.terminate()
                print(f"deadline: stopped {s}/{v}; it resumes at its next batch", flush=True)
            for _, proc, log in live:
                proc.wait()
                log.close()
            return
        for item in list(live):
            (s, v), proc, log = item
            if proc.poll() is not None:
                live.remove(item)
                log.close()
                print(f"[{time.perf_counter() - t0:6.0f}s] {s}/{v} exited {proc.returncode}", flush=True)


# ----------------------------------------------------------------------------- report


def _fmt(v, pct=True) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.1f} %" if pct else f"{v:.2f}"


def write_report(out: Path, work: Path, runs, args, argv, alias=None) -> None:
    """alias: runs not made because another variant comes to the same policy (`shared_runs`);
    they are reported with that run's results."""
    alias = alias or {}
    results = {}
    for s, v in runs:
        f = work / "{}-{}.json".format(*alias.get((s, v), (s, v)))
        if f.exists():
            results[(s, v)] = json.loads(f.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    init_file = work / "init.seconds.txt"
    init_s = init_file.read_text().strip() if init_file.exists() else "?"
    devices = sorted({r.get("device") or device_name() for r in results.values()}) or [device_name()]
    sources = sorted({r.get("heldout", "text sampled from the base model at `init`") for r in results.values()})
    held = " / ".join(x.replace(f"file {work}/heldout.txt", "the first 400 lines of WikiText-2 test") for x in sources)
    how = (f"rebuilt from the per-batch results in `{work}` of runs made with the same settings"
           if args.report_only else "")
    lines = ["# Edit quality at lifelong scale (SmolLM2-135M)", "",
             f"`python bench/quality.py {' '.join(argv)}` {how} on {', '.join(devices)}; store `init` {init_s} s. "
             "Strict metrics (DESIGN §6) of every live fact after each batch; prefixed efficacy over "
             f"{args.prefixes} sampled 5-token prefixes; neighbors unchanged vs the base model; perplexity "
             f"drift on held-out text ({held}, never edited for); fluency = n-gram entropy of greedy continuations.", ""]
    for scenario in dict.fromkeys(s for s, _ in runs):
        rs = {v: r for (s, v), r in results.items() if s == scenario and r["batches"]}
        if not rs:
            continue
        lines += [f"## {scenario}", ""]
        any_r = next(iter(rs.values()))
        planned = len(scenario_batches(scenario, args)[0])
        short = [f"{v} stopped after {len(r['batches'])} of {planned} batches" for v, r in rs.items()
                 if len(r["batches"]) < planned]
        if short:
            lines += ["Not finished when the run's time ran out (resume with the same command): "
                      + "; ".join(short) + ". Compare variants at equal edits in the per-batch table.", ""]
        if scenario == "same_subject":
            lines += [f"{any_r.get('dropped_inside_batches', 0)} of the {args.same_n} lines ask for a second value "
                      "of a subject and relation inside the same batch; the last one is kept.", ""]
        lines += ["| variant | edits | live facts | efficacy | prefixed | paraphrase | neighbors unchanged | "
                  "retention of batch 1 | perplexity drift | fluency | push s/fact |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for v, r in rs.items():
            e = r["batches"][-1]
            per_fact = sum(b["push_seconds"] for b in r["batches"]) / max(1, e["edits"])
            same = alias.get((scenario, v))
            label = VARIANTS[v][0] + (f" (the same policy as {same[1]}: its run)" if same else "")
            lines.append(f"| {label} | {e['edits']} | {e['live_facts']} | {_fmt(e['efficacy'])} | "
                         f"{_fmt(e['prefixed'])} | {_fmt(e['paraphrase'])} | {_fmt(e['neighbors_unchanged'])} | "
                         f"{_fmt(e['retention_batch1'])} | {_fmt(e['perplexity_drift'])} | "
                         f"{_fmt(e['fluency'], pct=False)} | {per_fact:.2f} |")
        lines.append("")
        if scenario == "counterfact":
            for v in ("shipped", "full"):
                if v in rs:
                    e = rs[v]["batches"][-1]
                    lines += [f"Targets ({VARIANTS[v][0]}, at {e['edits']} edits):", ""]
                    for k, (op, t) in TARGETS.items():
                        x = e.get(k)
                        ok = x is not None and (x >= t if op == ">=" else x <= t)
                        lines.append(f"- {k} {_fmt(x)} (target {op} {100 * t:.0f} %): {'met' if ok else 'NOT met'}")
                    lines.append("")
        ref = "shipped" if "shipped" in rs else "full"
        run_of = lambda v: alias.get((scenario, v), (scenario, v))  # noqa: E731
        twins = {v for v in rs if v != ref and run_of(v) == run_of(ref)}
        verdicts = against_ablations(rs, ref, twins)
        if verdicts:
            lines += [f"Against each other variant at equal edits (the method: {VARIANTS[ref][0]}; "
                      "why, where it does not win: `quality_notes.md`):", ""] + [f"- {x}" for x in verdicts] + [""]
        if scenario == "supersession":
            lines += ["| variant | newest value wins | first value gone | other facts of the subject hold |",
                      "|---|---:|---:|---:|"]
            for v, r in rs.items():
                s = r["batches"][-1].get("supersession", {})
                lines.append(f"| {VARIANTS[v][0]} | {_fmt(s.get('newest_wins'))} | "
                             f"{_fmt(s.get('first_value_gone'))} | {_fmt(s.get('other_facts_hold'))} |")
            lines.append("")
        png = plot(scenario, rs, out.parent, out.stem)
        if png:
            lines += [f"![{scenario}]({png.name})", ""]
        lines += ["<details><summary>per batch</summary>", "",
                  "| variant | batch | edits | efficacy | paraphrase | neighbors | retention b1 | ppl drift | push s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for v, r in rs.items():
            for b in r["batches"]:
                lines.append(f"| {v} | {b['batch']} | {b['edits']} | {_fmt(b['efficacy'])} | {_fmt(b['paraphrase'])} | "
                             f"{_fmt(b['neighbors_unchanged'])} | {_fmt(b['retention_batch1'])} | "
                             f"{_fmt(b['perplexity_drift'])} | {b['push_seconds']:.0f} |")
        lines += ["", "</details>", ""]
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({f"{s}/{v}": r for (s, v), r in results.items()}, indent=1) + "\n")
    print(out.read_text())


def against_ablations(rs: dict, ref: str, twins: set = frozenset()) -> list[str]:
    """Per other variant: does `ref` beat it on efficacy or retention of batch 1, at the most
    edits both runs reached (runs cut off by --deadline compare where they stopped)?
    twins: variants that come to ref's own policy, said so instead of compared."""
    if ref not in rs:
        return []
    out = []
    for v, r in rs.items():
        if v in twins:
            out.append(f"{VARIANTS[v][0]}: the same policy as {ref} (one run)")
            continue
        if v == ref or not r["batches"]:
            continue
        n = min(rs[ref]["batches"][-1]["edits"], r["batches"][-1]["edits"])
        a = next(b for b in rs[ref]["batches"] if b["edits"] == n)
        b = next(b for b in r["batches"] if b["edits"] == n)
        won = [k for k in ("efficacy", "retention_batch1")
               if a.get(k) is not None and b.get(k) is not None and a[k] > b[k]]
        detail = ", ".join(f"{k.replace('_', ' ')} {_fmt(a.get(k))} vs {_fmt(b.get(k))}"
                           for k in ("efficacy", "retention_batch1", "perplexity_drift"))
        verdict = f"beats it on {' and '.join(k.replace('_', ' ') for k in won)}" if won else \
            "does NOT beat it on efficacy or retention"
        out.append(f"{VARIANTS[v][0]}, at {n} edits: {ref} {verdict} ({detail})")
    return out


def plot(scenario: str, rs: dict, folder: Path, stem: str = "quality") -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = METRICS + ["retention_batch1"]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, k in zip(axes.flat, keys):
        for v, r in rs.items():
            xs = [b["edits"] for b in r["batches"]]
            ys = [b[k] for b in r["batches"]]
            if any(y is not None for y in ys):
                ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=v)
        ax.set_title(k.replace("_", " "))
        ax.set_xlabel("edits")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    axes.flat[-1].axis("off")
    fig.suptitle(f"{scenario}: metrics vs number of edits")
    fig.tight_layout()
    png = folder / f"{stem}_{scenario}.png"
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return png


if __name__ == "__main__":
    main()
