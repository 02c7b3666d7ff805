"""How long `init` takes, phase by phase, for a built-in model and its shipped policy.

Runs `lifelong init` on a fresh store, once with a WikiText-2 corpus file (as quality_quick and
the README's `--corpus` example) and once without one (the model samples its own text, as
`make demo` does), and times each phase from init's own log lines: model load, sampling,
C₀ (second moments), the residual Fisher, and the contexts/prefixes/held-out text. Results
append to bench/reports/init_speed.json and the table beside it is rebuilt.

    python bench/init_speed.py --model smollm2-135m --label shipped
    python bench/init_speed.py --model smollm2-135m --label fisher8k --init '{"fisher_tokens": 8192}'
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from benchdata import REPORTS, WIKI, plain_wikitext

PHASES = [("model ", "load"), ("sampling the MEMIT", "contexts + held-out"), ("sampling ", "sample text"),
          ("second moments", "C₀"), ("residual Fisher", "Fisher")]   # first matching prefix wins


def timed_init(model: str, policy_file: str | None, corpus: Path | None, store: Path) -> dict:
    """Seconds per phase of one init, read off the timestamps of its log lines."""
    from lifelong import api

    marks = [("start", time.perf_counter())]

    def log(msg, *a, **k):
        phase = next((ph for prefix, ph in PHASES if str(msg).startswith(prefix)), None)
        if phase is not None and phase not in (m for m, _ in marks):
            marks.append((phase, time.perf_counter()))

    api.init(store, model=model, policy=policy_file, corpus=str(corpus) if corpus else None, log=log)
    marks.append(("end", time.perf_counter()))
    phases = {}
    for (name, t), (_, t_next) in zip(marks, marks[1:]):
        phases["load" if name == "start" else name] = round(t_next - t, 1)
    return {"phases": phases, "total": round(marks[-1][1] - marks[0][1], 1),
            "store_mb": round(sum(f.stat().st_size for f in [store, *Path(f"{store}.d").rglob("*")] if f.is_file())
                              / 2**20, 1)}


def write_table(results: dict, out: Path) -> None:
    lines = ["# `init` speed per phase", "",
             "`python bench/init_speed.py --model M --label L [--init JSON]` per row (see the script's docstring).",
             "\"load\" is the model's load from the converted cache (the first load ever also converts the GGUF);",
             "\"contexts + held-out\" also covers writing the store. Target: under 120 s per model.", "",
             "| model | label | overrides | corpus | load | sample text | C₀ | Fisher | contexts + held-out | total s | threads | date |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for key, r in results.items():
        p = r["phases"]
        cells = [f"{p[k]:.1f}" if k in p else "—" for k in ("load", "sample text", "C₀", "Fisher", "contexts + held-out")]
        lines.append(f"| {r['model']} | {r['label']} | `{json.dumps(r['init']) if r['init'] else '—'}` | {r['corpus']} | "
                     + " | ".join(cells) + f" | {r['total']:.1f} | {r['threads']} | {r['date']} |")
    lines += ["", f"Device: CPU, {os.cpu_count()} cores; a run sharing the CPU with another job is slower."]
    out.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--label", default="shipped")
    ap.add_argument("--init", default="{}", help="policy overrides (JSON), e.g. fisher_tokens")
    ap.add_argument("--corpus", choices=["file", "sampled", "both"], default="both")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPORTS / "init_speed.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import yaml

    from lifelong.model.loading import checkpoint_dir, resolve_model
    from lifelong.policy import find_policy, load_policy

    over = json.loads(args.init)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pol = load_policy(find_policy(args.model)).with_overrides(**over)
        pol_file = tmp / "policy.yaml"
        pol_file.write_text(yaml.safe_dump(pol.file_data(), sort_keys=False))
        corpus = plain_wikitext(tmp / "corpus.txt", lines=20_000, src=WIKI)
        checkpoint_dir(resolve_model(args.model), log=lambda *a: None)   # converted once, outside the timing
        kinds = ["file", "sampled"] if args.corpus == "both" else [args.corpus]
        for kind in kinds:
            r = timed_init(args.model, str(pol_file), corpus if kind == "file" else None, tmp / f"{kind}.h5")
            entry = {"model": args.model, "label": args.label, "init": over, "corpus": kind,
                     "threads": args.threads, "date": time.strftime("%Y-%m-%d"), **r}
            print(json.dumps(entry), flush=True)
            out_json = out.with_suffix(".json")
            results = json.loads(out_json.read_text()) if out_json.exists() else {}
            results[f"{args.model}/{args.label}/{kind}"] = entry
            out_json.write_text(json.dumps(results, indent=1))
            write_table(results, out)


if __name__ == "__main__":
    main()
