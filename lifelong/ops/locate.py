"""`lifelong locate`: causal tracing on facts the model knows, and the edit layers it suggests.

Reads facts in ROME's known-facts format (a JSON array of {"prompt", "subject",
"attribute", ...}, as ROME's known_1000.json) or in the product's own fact format
(`lifelong.facts`: `prompt` is a template with "{}", the answer is `target`), keeps the
first `n` the model knows (`eval.tracing.known_facts`), traces them and writes a markdown
report with a PNG heatmap. Needs no store.
"""
from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

import numpy as np

from lifelong.errors import BadInput, FactFileError
from lifelong.eval import tracing
from lifelong.eval.tracing import TraceFact
from lifelong.facts import _kind, json_records, parse_facts
from lifelong.model.loading import load_model, resolve_model
from lifelong.ops import quiet

KNOWN_FIELDS = ("prompt", "subject", "attribute")   # required in a known-facts record; others are ignored
CHECK_CHUNK = 32    # facts checked for being known per forward pass


# -- reading facts ----------------------------------------------------------------

def read_trace_facts(path) -> list[TraceFact]:
    """The facts of a known-facts file (ROME) or a product fact file, as `TraceFact`s in file order.

    A file whose first record has `attribute` (and neither `target` nor
    `requested_rewrite`) is a known-facts file, as a JSON array or as JSONL; anything else
    is read by `lifelong.facts.parse_facts`. Raises BadInput listing every problem as
    `FILE:LINE: field: problem`.
    """
    name = os.fsdecode(path)
    try:
        data = Path(path).read_bytes()
    except (OSError, ValueError) as e:  # ValueError: a path with a NUL byte
        raise BadInput(f"{name}:0: file: {getattr(e, 'strerror', None) or e}") from None
    problems: list[str] = []
    facts: list[TraceFact] = []
    records = json_records(data, name, problems)
    first = next((v for _, v in records if isinstance(v, dict)), None)
    if first is not None and "attribute" in first and not {"target", "requested_rewrite"} & first.keys():
        facts = [f for line, value in records if (f := _known(value, name, line, problems)) is not None]
    else:
        try:
            facts = [TraceFact(f.render(), f.subject, f.target, f.prompt.index("{}"), f.line)
                     for f in parse_facts(data, name)]
        except FactFileError as e:
            problems = e.problems
    if not facts and not problems:
        problems.append(f"{name}:0: file: no facts")
    if problems:
        raise BadInput(f"{name}: {len(problems)} problem(s)\n" + "\n".join(problems),
                       hint="a known-facts record needs prompt, subject (written out in the prompt) and "
                            "attribute; a fact-file record needs subject, prompt (with {}) and target")
    return facts


def _known(value, name: str, line: int, problems: list[str]):
    """The TraceFact of one known-facts record, or None after reporting its problems."""
    where = f"{name}:{line}: "
    if not isinstance(value, dict):
        problems.append(where + f"line: not a JSON object (got {_kind(value)})")
        return None
    got: dict[str, str] = {}
    for key in KNOWN_FIELDS:
        v = value.get(key)
        if key not in value:
            problems.append(where + f"{key}: missing required field")
        elif not isinstance(v, str):
            problems.append(where + f"{key}: must be a string, got {_kind(v)}")
        elif not v.strip():
            problems.append(where + f"{key}: is empty")
        else:
            got[key] = v
    if len(got) < len(KNOWN_FIELDS):
        return None
    start = got["prompt"].find(got["subject"])
    if start < 0:
        problems.append(where + f"subject: {json.dumps(got['subject'])} does not occur in the prompt "
                        f"{json.dumps(got['prompt'])}")
        return None
    return TraceFact(got["prompt"], got["subject"], got["attribute"], start, line)


def known_subset(lm, tok, candidates: list[TraceFact], n: int, facts, log=quiet) -> tuple[list[TraceFact], int]:
    """(the first n candidates the model knows, how many were checked); BadInput naming the
    file `facts` if it knows none."""
    known, checked = [], 0
    while len(known) < n and checked < len(candidates):
        chunk = candidates[checked:checked + CHECK_CHUNK]
        known += tracing.known_facts(lm, tok, chunk)
        checked += len(chunk)
    log(f"{len(known)} of the first {checked} facts are known by the model")
    if not known:
        raise BadInput(f"the model knows none of the {checked} facts in {os.fsdecode(facts)} (their answer's "
                       "first token is never its top prediction); nothing to trace",
                       hint="give facts the model gets right, e.g. ROME's known_1000.json")
    return known[:n], checked


# -- the verb -----------------------------------------------------------------------

def locate(model: str, facts, n: int = 50, out=None, window: int = 10, samples: int = 10, seed: int = 0,
           edit_layers: int = 5, compare_layers: list[int] | None = None, grid_facts: int | None = 5,
           log=quiet) -> dict:
    """Causal tracing of the first `n` facts of `facts` that `model` knows.

    Returns per-layer indirect effects at the last subject token (hidden state, MLP
    window), the averages per ROME position group, the `edit_layers` consecutive layers
    with the largest MLP effect (fewer if the model has fewer layers), where
    `compare_layers` rank, the counts of facts checked and known, and, with `out`, the
    paths of OUT.md (report) and OUT.png (heatmap).
    """
    for flag, value in (("--n", n), ("--window", window), ("--samples", samples), ("--edit-layers", edit_layers)):
        if value < 1:
            raise BadInput(f"{flag} must be at least 1, got {value}")
    started = time.perf_counter()
    candidates = read_trace_facts(facts)
    source = resolve_model(model)
    lm, tok = load_model(source, log=log)
    n_layers = len(tracing.decoder_layers(lm))
    tracing.mlp_modules(lm)   # fails now, not after the known-facts pass, if there is no .mlp
    compare = sorted(set(compare_layers)) if compare_layers else None
    if compare and not all(0 <= layer < n_layers for layer in compare):
        raise BadInput(f"--compare-layers {','.join(map(str, compare))}: the model has layers 0-{n_layers - 1}")

    known, checked = known_subset(lm, tok, candidates, n, facts, log)
    # the heatmap's every position for the first grid_facts facts; the rest only at the last
    # subject token, where the edit layers are read (a few times cheaper per fact)
    result = tracing.trace(lm, tok, known, samples=samples, window=window, seed=seed, grid_facts=grid_facts, log=log)
    hidden, mlp = result.at_last_subject(tracing.HIDDEN), result.at_last_subject(tracing.MLP)
    k = min(edit_layers, n_layers)
    suggested = tracing.suggest_window(mlp, k)

    data = {
        "model": {"name": model, **{key: v for key, v in source.to_dict().items() if key != "name"}},
        "facts_file": os.path.abspath(os.fsdecode(facts)),
        "in_file": len(candidates), "checked": checked, "traced": len(known),
        "samples": samples, "window": window, "seed": seed, "noise_std": result.noise, "grid_facts": grid_facts,
        "n_layers": n_layers,
        "p_clean": float(np.mean([f.p_clean for f in result.facts])),
        "p_corrupted": float(np.mean([f.p_corrupted for f in result.facts])),
        "layers": [{"layer": i, "hidden": float(hidden[i]), "mlp": float(mlp[i])} for i in range(n_layers)],
        "suggested_layers": suggested,
        "edit_layers": k,
        "compare": _compare(mlp, compare) if compare else None,
        "categories": list(tracing.CATEGORIES),
        "hidden_effect": _jsonable(result.hidden_effect),
        "mlp_effect": _jsonable(result.mlp_effect),
        "facts": [{"prompt": f.fact.prompt, "subject": f.fact.subject, "answer": f.fact.answer,
                   "line": f.fact.line, "tokens": f.tokens, "subject_tokens": [f.first, f.last],
                   "p_clean": f.p_clean, "p_corrupted": f.p_corrupted,
                   "hidden_last_subject": _jsonable(f.effect(tracing.HIDDEN)[:, f.last]),
                   "mlp_last_subject": _jsonable(f.effect(tracing.MLP)[:, f.last])} for f in result.facts],
        "report": None, "heatmap": None,
    }
    data["command"] = _command(model, source, facts, n, out, window, samples, seed, edit_layers, compare)
    data["seconds"] = round(time.perf_counter() - started, 1)
    if out is not None:
        base = os.fsdecode(out)
        base = base[:-3] if base.endswith(".md") else base
        Path(base).parent.mkdir(parents=True, exist_ok=True)
        data["heatmap"] = _heatmap(result, base + ".png", model)
        data["report"] = base + ".md"
        Path(data["report"]).write_text(_report(data), encoding="utf-8")
        log(f"wrote {data['report']} and {data['heatmap']}")
    return data


def _jsonable(a: np.ndarray):
    """Nested lists of floats, NaN as None (JSON has no NaN)."""
    return [_jsonable(x) for x in a] if np.ndim(a) else (None if np.isnan(a) else float(a))


def _compare(mlp: np.ndarray, layers: list[int]) -> dict:
    """Where `layers` stand by MLP effect at the last subject token: each layer's rank among all
    layers (1 = largest), and, if they are consecutive, their run's rank among all runs of as many."""
    order = np.argsort(-mlp, kind="stable")
    rank = {int(layer): r + 1 for r, layer in enumerate(order)}
    k = len(layers)
    sums = [float(mlp[lo:lo + k].sum()) for lo in range(len(mlp) - k + 1)]
    total = float(mlp[layers].sum())
    consecutive = layers == list(range(layers[0], layers[0] + k))
    best = tracing.suggest_window(mlp, k)
    return {"layers": layers, "ranks": {str(layer): rank[layer] for layer in layers}, "sum": total,
            "best_run": best, "best_sum": float(mlp[best].sum()),
            "run_rank": 1 + sum(s > total for s in sums) if consecutive else None, "runs": len(sums)}


def _command(model, source, facts, n, out, window, samples, seed, edit_layers, compare) -> str:
    model_arg = model if source.kind == "builtin-gguf" else source.path
    args = ["lifelong", "locate", "--model", model_arg, "--facts", os.path.abspath(os.fsdecode(facts)),
            "--n", n, "--window", window, "--samples", samples, "--seed", seed, "--edit-layers", edit_layers]
    if compare:
        args += ["--compare-layers", ",".join(map(str, compare))]
    if out is not None:
        args += ["--out", os.path.abspath(os.fsdecode(out))]
    return shlex.join(map(str, args))


def _span(layers: list[int]) -> str:
    return f"{layers[0]}–{layers[-1]}" if len(layers) > 1 else str(layers[0])


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _report(d: dict) -> str:
    """The markdown report of a `locate` result."""
    sug, compare = d["suggested_layers"], d["compare"] or {}
    m = d["model"]
    lines = [
        f"# Causal trace of {d['model']['name']}",
        "",
        "Where the model recalls facts, by causal tracing (ROME, Meng et al. 2022, §2): the subject's",
        f"input embeddings are corrupted with Gaussian noise (std {d['noise_std']:.4g}, 3 × the std of the",
        f"embeddings over the vocabulary; {d['samples']} samples, seed {d['seed']}), then one clean state is",
        "restored at one position. Indirect effect = p(answer) restored − p(answer) corrupted, averaged",
        "over the facts. *Hidden state*: the layer's output; *MLP*: the MLP outputs of a window of",
        f"{d['window']} layers around it (what MEMIT picks its edit layers from).",
        "",
        f"- model: `{m['name']}` ({m['kind']}, {d['n_layers']} layers, sha256 {m['sha256'][:16]}…)",
        f"- facts: `{d['facts_file']}`: the first {d['checked']} of its {d['in_file']} facts were checked, "
        f"{d['traced']} traced (facts whose answer's first token is the model's strict top prediction)",
        f"- mean p(answer): clean {d['p_clean']:.3f}, corrupted {d['p_corrupted']:.3f}",
        f"- took {d['seconds']:.0f} s",
        "",
        "## Suggested edit layers",
        "",
        f"**{_span(sug)}** ({', '.join(map(str, sug))}): the {d['edit_layers']} consecutive layers with the "
        "largest summed MLP indirect effect at the last subject token (sum "
        f"{sum(d['layers'][i]['mlp'] for i in sug):.4f}; ties go to the lower layers).",
    ]
    if compare:
        ranks = ", ".join(f"{layer}: #{r}" for layer, r in compare["ranks"].items())
        lines += ["", f"Compared layers {', '.join(map(str, compare['layers']))}: summed MLP effect "
                  f"{compare['sum']:.4f} (best run of {len(compare['layers'])}: {_span(compare['best_run'])}, "
                  f"{compare['best_sum']:.4f}); "
                  + (f"run rank {compare['run_rank']} of {compare['runs']}; " if compare["run_rank"] else "")
                  + f"each layer's rank of {d['n_layers']}: {ranks}."]
    lines += ["", "## Indirect effect at the last subject token", "",
              f"| layer | hidden state | MLP (window {d['window']}) | |", "|---:|---:|---:|:--|"]
    for row in d["layers"]:
        marks = (["suggested"] if row["layer"] in sug else []) + (
            ["compared"] if row["layer"] in compare.get("layers", []) else [])
        lines.append(f"| {row['layer']} | {row['hidden']:.4f} | {row['mlp']:.4f} | {', '.join(marks)} |")
    if d["heatmap"]:
        lines += ["", "Every position group (ROME's), averaged over facts:", "",
                  f"![indirect effect heatmap]({os.path.basename(d['heatmap'])})"]
    lines += ["", "## Facts traced", "", "| # | prompt | answer | p clean | p corrupted |", "|---:|:--|:--|---:|---:|"]
    for i, f in enumerate(d["facts"], 1):
        lines.append(f"| {i} | {_cell(f['prompt'])} | {_cell(f['answer'])} | {f['p_clean']:.3f} | "
                     f"{f['p_corrupted']:.3f} |")
    lines += ["", "## Reproduce", "", "```", d["command"], "```", ""]
    return "\n".join(lines)


def _heatmap(result, path: str, title: str) -> str:
    """A PNG of the mean indirect effect, position groups × layers, hidden-state and MLP panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg   # no pyplot: no global backend
    from matplotlib.figure import Figure

    L = result.n_layers
    fig = Figure(figsize=(max(6.0, 0.28 * L + 3.0), 6.0), layout="constrained")
    FigureCanvasAgg(fig)
    panels = ((result.hidden_effect, "hidden state", "Purples"),
              (result.mlp_effect, f"MLP, window of {result.window} layers", "Greens"))
    for ax, (effect, label, cmap) in zip(fig.subplots(2, 1), panels):
        image = ax.imshow(np.ma.masked_invalid(effect.T), aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_yticks(range(len(tracing.CATEGORIES)), tracing.CATEGORIES)
        ax.set_xticks(range(L))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("layer")
        ax.set_title(f"restoring the {label}: p(answer) − p(corrupted)", fontsize=10)
        fig.colorbar(image, ax=ax, label="indirect effect")
    fig.suptitle(f"causal trace of {title} ({len(result.facts)} facts)", fontsize=11)
    fig.savefig(path, dpi=110)
    return path
