"""PEFT adapter vs merged export on SmolLM2-135M: max abs logit difference, and where it comes from.

Inits a store for the built-in `smollm2-135m` (preserved statistics over cleaned
WikiText-2 lines), pushes two batches of CounterFact dev facts, exports the head merged
and as a PEFT adapter, loads both with plain transformers / peft in fp32 and compares
their logits (every position) on the facts' prompts, neighbor prompts and plain English
sentences. To tell rounding from error it also runs, on the same prompts:

* the exact edit in float64: base weights + ΣAB unrounded, float64 forward (the reference);
* the merged weights (rounded once to fp32) with a float64 forward: weight rounding alone;
* the adapter with a float64 forward: the adapter's own error;
* the adapter and the merged export, both loaded in float64: the exports against each other,
  without the fp32 forward's rounding (the comparison the 1e-4 target is read on);
* the merged weights as store format 1 summed them (fp32, rounded after each batch);
* the base model in fp32 vs float64: the fp32 forward's own noise on this model.

    python bench/peft_match.py --out bench/reports/peft_match.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lifelong import api
from lifelong.facts import load_facts
from lifelong.policy import policy_from_json
from lifelong.store.migrations import summed_v1
from lifelong.model.session import active_factors
from lifelong.store.layout import layer_key
from lifelong.store.store import Store
from lifelong.model.weights import get_module
from lifelong.deltas import materialize
from lifelong.policy import module_name

from benchdata import REPORTS, SHARED, plain_wikitext

PLAIN = [
    "The weather in London was cold and wet for most of the year.",
    "She opened the door and saw that the garden was full of snow.",
    "In 1905 Albert Einstein published four papers that changed physics.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Most trains leave the central station every fifteen minutes.",
    "The committee will meet again next Tuesday to discuss the budget.",
]
TOL = 1e-4



def logits(model, tok, prompts: list[str]) -> list[torch.Tensor]:
    """Per prompt, its logits at every position (T, vocab), one prompt at a time (no padding)."""
    return [model(**tok(p, return_tensors="pt")).logits[0].to(torch.float64) for p in prompts]


def diffs(xs, ys) -> list[float]:
    """Per prompt, the max abs difference of two runs' logits."""
    return [float((x - y).abs().max()) for x, y in zip(xs, ys)]


def with_edited(model, policy, weights: dict[int, torch.Tensor]):
    """`model` with the edited matrices replaced (in its own dtype)."""
    for l, w in weights.items():
        mod = get_module(model, module_name(policy.module_template, l))
        with torch.no_grad():
            mod.weight.copy_(w.to(mod.weight.dtype))  # (d_out, d_in): Llama's down_proj is an nn.Linear
    return model


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=5, help="facts per batch (two batches)")
    ap.add_argument("--skip", type=int, default=400, help="first dev line to use")
    ap.add_argument("--corpus-lines", type=int, default=2000)
    ap.add_argument("--out", default=str(REPORTS / "peft_match.md"))
    args = ap.parse_args(argv)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    phases = {}
    tmp = Path(tempfile.mkdtemp(prefix="lifelong-peft-"))
    store_path = tmp / "s.h5"
    api.init(store_path, model="smollm2-135m", corpus=str(plain_wikitext(tmp / "corpus.txt", args.corpus_lines, drop_unk_lines=True)))
    phases["init"] = time.perf_counter() - t0
    rows = (SHARED / "counterfact" / "counterfact_dev_3000.jsonl").read_text().splitlines()
    batches = []
    for i in range(2):
        f = tmp / f"b{i + 1}.jsonl"
        f.write_text("\n".join(rows[args.skip + i * args.facts : args.skip + (i + 1) * args.facts]) + "\n")
        rep = api.push(store_path, f)
        batches.append({"batch": rep.batch_id, "efficacy": rep.summary["efficacy"]})
    phases["push"] = time.perf_counter() - t0 - sum(phases.values())
    api.export(store_path, tmp / "merged")
    meta = api.export(store_path, tmp / "adapter", format="peft")
    phases["export"] = time.perf_counter() - t0 - sum(phases.values())

    facts = [fact for b in (1, 2) for fact in load_facts(tmp / f"b{b}.jsonl").facts]
    prompts = [f.render() for f in facts] + [n.prompt for f in facts for n in f.neighbors[:1]] + PLAIN
    kinds = ["fact"] * len(facts) + ["neighbor"] * (len(prompts) - len(facts) - len(PLAIN)) + ["plain"] * len(PLAIN)
    tok = AutoTokenizer.from_pretrained(tmp / "merged")

    def run(path, dtype=torch.float32, weights=None, adapter=None) -> list[torch.Tensor]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        if weights is not None:
            with_edited(model, policy, weights)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter).to(dtype).eval()
        return logits(model, tok, prompts)

    store = Store.open(store_path)
    policy = policy_from_json(store.policy_json)
    arrays = store.base_arrays([layer_key(l, "W") for l in policy.layers])
    base = {l: torch.from_numpy(arrays[layer_key(l, "W")]) for l in policy.layers}
    factors = active_factors(store, store.records, policy)
    exact = {l: base[l].double() + sum(a.double() @ b.double() for a, b in factors[l]) for l in policy.layers}
    head = {l: materialize(base[l], factors[l]) for l in policy.layers}
    v1 = {l: summed_v1(base[l], factors[l]) for l in policy.layers}
    base_dir, adapter = meta["base_model"], tmp / "adapter"

    merged, peft = run(tmp / "merged"), run(base_dir, adapter=adapter)   # what a user serves
    merged64, peft64 = run(tmp / "merged", torch.float64), run(base_dir, torch.float64, adapter=adapter)
    ref = run(base_dir, torch.float64, weights=exact)                     # the exact edit, float64 forward
    compared = {   # name -> (what, per-prompt max abs logit difference)
        "peft_vs_merged": ("PEFT (base + adapter) fp32 vs merged export fp32", diffs(peft, merged)),
        "peft64_vs_merged64": ("PEFT (base + adapter) vs merged export, both loaded in float64",
                               diffs(peft64, merged64)),
        "peft_vs_exact": ("PEFT fp32 vs the exact edit (float64 weights and forward)", diffs(peft, ref)),
        "merged_vs_exact": ("merged fp32 vs the exact edit", diffs(merged, ref)),
        "merged64_vs_exact": ("merged weights (rounded once), float64 forward vs the exact edit",
                              diffs(merged64, ref)),
        "peft64_vs_exact": ("PEFT adapter, float64 forward vs the exact edit", diffs(peft64, ref)),
        "format1_vs_peft": ("format-1 merged (fp32, rounded after each batch) vs PEFT fp32",
                            diffs(run(tmp / "merged", weights=v1), peft)),
        "base32_vs_base64": ("base model fp32 vs float64 forward: the fp32 forward's own error",
                             diffs(run(base_dir), run(base_dir, torch.float64))),
    }
    phases["compare"] = time.perf_counter() - t0 - sum(phases.values())
    per = compared["peft_vs_merged"][1]
    per64 = compared["peft64_vs_merged64"][1]
    res = {
        "peft64_vs_merged64": {"max": max(per64), "median": statistics.median(per64),
                               "over_tol": sum(d > TOL for d in per64)},
        "prompts": len(prompts), "kinds": {k: kinds.count(k) for k in set(kinds)}, "batches": batches,
        "ranks": {l: v["rank"] for l, v in meta["layers"].items()},
        "peft_vs_merged": {"max": max(per), "median": statistics.median(per), "over_tol": sum(d > TOL for d in per),
                           "worst": prompts[per.index(max(per))]},
        "max": {k: max(v) for k, (_, v) in compared.items()},
        "labels": {k: what for k, (what, _) in compared.items()},
        "per_prompt": [{"kind": k, "prompt": p, **{name: v[i] for name, (_, v) in compared.items()}}
                       for i, (k, p) in enumerate(zip(kinds, prompts))],
        "merged_weights_bits_equal_head": all(
            torch.equal(w, torch.from_numpy(_merged_weight(tmp / "merged", policy, l))) for l, w in head.items()),
        "max_logit": max(float(x.abs().max()) for x in merged),
        "format1_weights_differ": sum(int((v1[l] != head[l]).sum()) for l in policy.layers),
        "weights_total": sum(w.numel() for w in head.values()),
        "threads": torch.get_num_threads(),
        "phases_s": phases,
        "seconds": time.perf_counter() - t0,
    }
    write_report(Path(args.out), res, argv if argv is not None else sys.argv[1:])
    Path(args.out).with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "per_prompt"}, indent=2))
    return res


def _merged_weight(folder: Path, policy, layer: int):
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))[module_name(policy.module_template, layer) + ".weight"]


def write_report(out: Path, res: dict, argv) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    pm, p64, mx = res["peft_vs_merged"], res["peft64_vs_merged64"], res["max"]
    cols = ["peft64_vs_merged64", "peft_vs_merged", "format1_vs_peft", "base32_vs_base64"]
    lines = [
        "# PEFT adapter vs merged export on SmolLM2-135M (this CPU)",
        "",
        f"`python bench/peft_match.py {' '.join(argv)}` — two batches "
        f"(strict efficacy {', '.join(format(b['efficacy'], '.2f') for b in res['batches'])}), adapter ranks "
        f"{res['ranks']}; {res['prompts']} prompts "
        f"({', '.join(f'{v} {k}' for k, v in sorted(res['kinds'].items()))}), "
        f"logits at every position compared; torch threads {res['threads']}, {res['seconds']:.0f} s in all "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in res['phases_s'].items())}).",
        "",
        f"**PEFT (base + adapter) vs merged export, both loaded with plain transformers/peft in float64: "
        f"max abs logit difference {p64['max']:.2e}** ({'within' if p64['max'] <= TOL else 'over'} the "
        f"{TOL:g} target; median over prompts {p64['median']:.2e}, {p64['over_tol']} of {res['prompts']} "
        f"prompts over). This compares the two exports; loaded in fp32, each forward also carries the fp32 "
        f"arithmetic's own rounding, which on the unedited base model alone is up to "
        f"{mx['base32_vs_base64']:.2e} (fp32 against float64 forward), larger than the target.",
        "",
        f"PEFT (base + adapter, fp32) vs merged export (fp32): max abs logit difference {pm['max']:.2e} "
        f"({'within' if pm['max'] <= TOL else 'over'} the {TOL:g} target); median over prompts "
        f"{pm['median']:.2e}; {pm['over_tol']} of {res['prompts']} prompts over {TOL:g}, the largest on "
        f"{pm['worst']!r}. Logits reach |{res['max_logit']:.1f}|. The merged checkpoint's edited matrices are "
        f"bit-identical to `deltas.materialize` at head: {res['merged_weights_bits_equal_head']}.",
        "",
        "Where the difference comes from (max over all prompts and positions):",
        "",
        "| comparison | max abs logit diff |",
        "|---|---:|",
    ] + [f"| {res['labels'][k]} | {v:.2e} |" for k, v in mx.items()] + [
        "",
        f"Weights alone (float64 forwards): rounding the merged weights once to fp32 moves the logits by at "
        f"most {mx['merged64_vs_exact']:.1e}, and the adapter is within {mx['peft64_vs_exact']:.1e} of the "
        f"exact edit. The fp32 forward alone: the base model, fp32 against float64, differs by up to "
        f"{mx['base32_vs_base64']:.1e}; PEFT's fp32 forward (W·x + B·(A·x)) and the merged one (W'·x) round "
        f"differently through 30 layers, each {mx['peft_vs_exact']:.1e} / {mx['merged_vs_exact']:.1e} from "
        f"the exact edit. "
        + ("So what is left of PEFT vs merged is the fp32 forward's own rounding, not the exports. "
           if max(mx['merged64_vs_exact'], mx['peft64_vs_exact']) < mx['peft_vs_merged'] / 3
           and mx['base32_vs_base64'] >= mx['peft_vs_merged'] / 2 else "")
        + f"Store format 1's summation (rounded after each batch; {res['format1_weights_differ']} of "
        f"{res['weights_total']} edited entries differ by an ulp from format 2's) gives "
        f"{mx['format1_vs_peft']:.2e} against PEFT on the same prompts.",
        "",
        "Per prompt:",
        "",
        "| kind | prompt | " + " | ".join(res["labels"][c].split(":")[0] for c in cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ] + [f"| {r['kind']} | {r['prompt']} | " + " | ".join(f"{r[c]:.2e}" for c in cols) + " |"
         for r in res["per_prompt"]]
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
