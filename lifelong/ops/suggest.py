"""`lifelong policy suggest`: a starting policy for a model nobody has tuned.

Traces facts the model knows for its edit layers (as `lifelong locate`), reads C₀, the edit
keys and the residual stream at those layers (`edit.calibration.measure`), and carries the
reference policy (the shipped SmolLM2-135M one) over with `edit.calibration`'s rules. The
file it writes opens with a header that says how each value was derived; `lifelong init
--policy FILE` takes it unchanged. With `check`, a fresh store in a temporary folder takes
two batches of the user's facts and their efficacy, neighbors and drift are reported; the
first batch also calibrates the value step (`calibration.calibrated_step`).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from lifelong.edit import calibration
from lifelong.edit.calibration import REFERENCE
from lifelong.errors import BadInput
from lifelong.eval import tracing
from lifelong.facts import load_facts
from lifelong.model.corpus import chunk_tokens, read_corpus, sample_sequences
from lifelong.model.loading import load_model, resolve_model
from lifelong.ops import quiet
from lifelong.ops.locate import known_subset, read_trace_facts
from lifelong.policy import find_policy, layer_name, load_policy, module_name

MEASURE_TOKENS = 20_000      # text tokens C₀ is measured from: as for the reference
SEQ_LEN = 128
MEASURE_FACTS = 100          # facts whose subject keys are measured (a forward each, up to the last layer)
TRACE_SAMPLES = 3            # noise samples per traced fact (only the last subject token is traced)
MLP_OUTPUTS = ("down_proj", "c_proj", "fc_out", "fc2", "dense_4h_to_h")   # an MLP's output matrix, by family


def mlp_output_template(model) -> str:
    """'model.layers.{}.mlp.down_proj' (or the family's name for the MLP's output matrix)."""
    layers = tracing.decoder_layers(model)
    mlp = tracing.mlp_modules(model)[0]
    child = next((n for n in MLP_OUTPUTS if isinstance(getattr(mlp, n, None), torch.nn.Module)), None)
    if child is None:
        raise BadInput(f"{type(model).__name__}: the MLP of layer 0 has none of {', '.join(MLP_OUTPUTS)}",
                       hint="write the policy's module_template by hand")
    name = next(n for n, m in model.named_modules() if m is layers[0])      # e.g. model.layers.0
    return name[: -len("0")] + "{}" + f".mlp.{child}"


def suggest(model: str, facts, out=None, n: int = 20, layers: list[int] | None = None, edit_layers: int = 5,
            corpus=None, samples: int = TRACE_SAMPLES, seed: int = 0, check: int = 0, check_facts=None,
            log=quiet) -> dict:
    """Derive a policy for `model` from the first `n` facts of `facts` it knows (ROME's
    known-facts format or a fact file), write it to `out` (if given) and return the
    derivation. layers: skip tracing and edit these. corpus: a text file for C₀ (else the
    model samples its own text). check: push that many facts of `check_facts` (two batches)
    into a temporary store made with the policy and report what they did; the step is then
    the one calibrated on the first batch, if it moved."""
    if check and check_facts is None:
        raise BadInput("--check needs --check-facts: a fact file to push", hint="e.g. --check-facts dev.jsonl")
    if check and check < 2:
        raise BadInput(f"--check must be at least 2 (two batches), got {check}")
    check_rows = load_facts(check_facts).facts[:check] if check else []   # a bad file fails before the model loads
    if check and len(check_rows) < check:
        raise BadInput(f"{os.fsdecode(check_facts)}: holds {len(check_rows)} facts, --check asks for {check}")
    started = time.perf_counter()
    candidates = read_trace_facts(facts)
    texts = read_corpus(corpus) if corpus is not None else None
    source = resolve_model(model)
    lm, tok = load_model(source, log=log)
    template = mlp_output_template(lm)
    n_layers = len(tracing.decoder_layers(lm))
    known, checked, trace = [], 0, None
    if layers is None:
        known, checked = known_subset(lm, tok, candidates, n, facts, log)
        log(f"tracing {len(known)} known facts at the last subject token ({samples} noise samples each)")
        result = tracing.trace(lm, tok, known, samples=samples, seed=seed, grid_facts=0, log=log)
        mlp = result.at_last_subject(tracing.MLP)
        layers = tracing.suggest_window(mlp, min(edit_layers, n_layers))
        trace = {"mlp_effect": [float(x) for x in mlp], "samples": samples, "facts": len(known)}
    elif not layers or any(not 0 <= x < n_layers for x in layers) or layers != sorted(set(layers)):
        raise BadInput(f"--layers {layers}: give increasing layers within 0-{n_layers - 1}")
    if texts is not None:
        seqs = chunk_tokens(tok, texts, MEASURE_TOKENS, SEQ_LEN)
    else:
        log(f"sampling {MEASURE_TOKENS} tokens of text from the model")
        seqs = sample_sequences(lm, tok, math.ceil(MEASURE_TOKENS / SEQ_LEN), SEQ_LEN, seed=seed)
    # the keys an edit writes at: the last subject token of the file's first facts, known or not
    # (the facts a user edits are mostly ones the model does not know)
    encoded = [tracing.encode(tok, f) for f in candidates[:MEASURE_FACTS]]
    prompts = [(e.ids, e.last) for e in encoded]                  # (prompt ids, last subject position)
    names = [module_name(template, x) for x in layers]
    m = calibration.measure(lm, names, [layer_name(template, x) for x in layers], layers, prompts, seqs)
    desc = _describe(lm)
    del lm
    policy, header = _derive(model, desc, template, layers, m, trace, len(prompts))
    check_result = None
    if check:
        check_result = self_check(model, _text(policy, header), check_rows, corpus, policy.values.step_size, log)
        policy, header = _derive(model, desc, template, layers, m, trace, len(prompts), check_result)
    data, text = _file_data(policy), _text(policy, header)
    result = {"model": model, "layers": layers, "module_template": template, "traced": len(known),
              "measured_facts": len(prompts),
              "checked": checked, "measured": _measured_dict(m), "policy": data,
              "trace": trace, "out": None, "check": check_result}
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text, encoding="utf-8")
        result["out"] = os.fsdecode(out)
        log(f"wrote {out}")
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["text"] = text
    return result


def _describe(lm) -> str:
    """'Gemma3ForCausalLM, 18 layers, hidden 640'."""
    cfg = lm.config
    return (f"{cfg.architectures[0] if getattr(cfg, 'architectures', None) else type(lm).__name__}, "
            f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}")


def _text(policy, header: str) -> str:
    return header + yaml.safe_dump(_file_data(policy), sort_keys=False, allow_unicode=True)


def _derive(model: str, desc: str, template: str, layers: list[int], m: calibration.Measured, trace,
            n_facts: int, checked: dict | None = None):
    """The suggested Policy and its header (comment lines); `checked`: the self-check, whose
    first batch may have calibrated the step."""
    ref_pol = load_policy(find_policy(REFERENCE.model))
    bulk_step = float(f"{calibration.step_size_for(m.bulk_share):.3g}")
    calibrated = checked["calibrated_step"] if checked else None
    step = calibrated or bulk_step
    lam = calibration.mom2_weight_for(m.key_mahalanobis)
    thr = calibration.threshold_for(m.eigvals, REFERENCE.kept_energy)
    name = Path(os.fsdecode(model)).stem if os.sep in model or model.endswith(".gguf") else model
    policy = ref_pol.with_overrides(
        name=name, model=f"{model} ({desc})",
        source=f"lifelong policy suggest ({time.strftime('%Y-%m-%d')}): {REFERENCE.model}'s checked policy "
               "carried over by the rules in lifelong/edit/calibration.py (header)",
        module_template=template, layers=layers,
        values={"step_size": step},
        update={"mom2_weight": float(f"{lam:.3g}")},
        preserved={"nullspace_threshold": float(f"{thr:.3g}")})
    where = (f"the {len(layers)} consecutive layers with the largest MLP indirect effect at\n  the last "
             f"subject token (causal tracing of {trace['facts']} known facts, {trace['samples']} noise samples each)"
             if trace else "given by --layers")
    lines = [
        f"{name}: suggested by `lifelong policy suggest`, {time.strftime('%Y-%m-%d')}. Each value below is",
        f"{REFERENCE.model}'s (tuned on CounterFact dev facts) unless this header says how it was carried over;",
        f"measured on {m.tokens} text tokens and the subjects of {n_facts} facts at layers {layers[0]}-{layers[-1]}.",
        f"- layers {layers}: {where}.",
        f"- values.step_size {bulk_step:g} = {REFERENCE.step_size:g} x bulk share {m.bulk_share:.3f} / "
        f"{REFERENCE.bulk_share:.3f}: the share of |h| outside the {m.massive_channels} massive channel(s)",
        f"  (RMS >= {calibration.MASSIVE:g}x the median channel's) at layer {layers[-1]}, |h| {m.h_norm:.0f}.",
        *([f"  Calibrated to {step:g}: at {bulk_step:g} the check's first batch took {checked['value_steps']:.2f} "
           f"steps per value,", f"  the reference {REFERENCE.value_steps:g}; {step:g} = {bulk_step:g} x "
           f"{checked['value_steps']:.2f} / {REFERENCE.value_steps:g} gives values the reference's granularity."]
          if calibrated else []),
        f"- update.mom2_weight {policy.update.mom2_weight:g} = {REFERENCE.mom2_weight:g} x median k^T C0^-1 k "
        f"{m.key_mahalanobis:.0f} / {REFERENCE.key_mahalanobis:.0f}:",
        "  a lone edit key is written with the same share m/(m+lambda) as on the reference.",
        f"- preserved.nullspace_threshold {policy.preserved.nullspace_threshold:.3g}: the null space holds at most "
        f"{REFERENCE.kept_energy:.1%} of tr(C0) at every layer,",
        f"  as {REFERENCE.threshold:g} does on the reference (used by update.project true; init needs one kept direction).",
        "- contexts, steps, clamp, KL, weight decay, alignment, merging, the room rule and gates: the reference's.",
        *([f"Checked on {sum(r['facts'] for r in checked['batches'])} of your facts in two batches:"]
          + [f"  {check_line(r)}" for r in checked["batches"]] if checked else
          ["Check it on your own facts: lifelong policy suggest ... --check 20 --check-facts FILE."]),
    ]
    return policy, "".join(f"# {line}\n" for text in lines for line in text.split("\n"))


def _file_data(policy) -> dict:
    """The policy file's data without the settings its own choices never read (init would warn)."""
    data = policy.file_data()
    probe = type(policy).model_validate(data)
    for line in probe.unused():
        section, field = line.split(":")[0].split(".")
        data[section].pop(field, None)
    return data


def _measured_dict(m: calibration.Measured) -> dict:
    return {"bulk_share": m.bulk_share, "massive_channels": m.massive_channels, "h_norm": m.h_norm,
            "key_mahalanobis": m.key_mahalanobis, "d_in": m.d_in, "tokens": m.tokens,
            "min_eig": {str(x): float(np.min(ev)) for x, ev in m.eigvals.items()}}


def self_check(model: str, policy_text: str, facts: list, corpus, step: float, log=quiet) -> dict:
    """Init a store with the policy in a temporary folder and push `facts` in two batches:
    each batch's efficacy, neighbors unchanged and perplexity drift. When the first batch's
    values take more or fewer steps than the reference's (`calibration.calibrated_step`),
    the store goes back to its base and both batches are pushed with the calibrated step."""
    from lifelong.ops.init import init
    from lifelong.ops.push import push
    from lifelong.ops.rollback import rollback

    half = len(facts) // 2
    batches = [facts[:half], facts[half:]]
    rows, result = [], {"step": step, "value_steps": None, "calibrated_step": None}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pol_file = tmp / "policy.yaml"
        pol_file.write_text(policy_text, encoding="utf-8")
        log("check: init a temporary store with the suggested policy")
        store = init(tmp / "check.h5", model=model, policy=str(pol_file),
                     corpus=os.fsdecode(corpus) if corpus is not None else None, log=log)
        paths = []
        for i, batch in enumerate(batches, 1):
            paths.append(tmp / f"check{i}.jsonl")
            paths[-1].write_text("".join(json.dumps({k: v for k, v in f.to_dict().items() if k != "line"}) + "\n"
                                         for f in batch), encoding="utf-8")
        first = push(store.path, paths[0], log=log)
        result["value_steps"] = first.mean_steps
        new = calibration.calibrated_step(step, first.mean_steps)
        overrides = {}
        if new is not None:
            new = float(f"{new:.3g}")
            log(f"check: values took {first.mean_steps:.2f} steps on average, the reference "
                f"{REFERENCE.value_steps:g}; step {step:g} -> {new:g}, both batches again from the base")
            result["calibrated_step"], overrides = new, {"values": {"step_size": new}}
            rollback(store.path, 0)
            first = push(store.path, paths[0], log=log, policy_overrides=overrides)
        rows.append(_check_row(1, len(batches[0]), first, log))
        rows.append(_check_row(2, len(batches[1]), push(store.path, paths[1], log=log, policy_overrides=overrides), log))
    return {**result, "batches": rows}


def _check_row(batch: int, n_facts: int, rep, log) -> dict:
    """A self-check batch's efficacy, neighbors unchanged and drift, logged."""
    s = rep.summary
    row = {"batch": batch, "facts": n_facts, "efficacy": s["efficacy"],
           "neighbors_unchanged": s["neighbors_unchanged"], "perplexity_drift": s["perplexity_drift"]}
    log(check_line(row))
    return row


def check_line(row: dict) -> str:
    """One self-check batch in words (a metric the facts cannot give, e.g. neighbors without any, is '-')."""
    def num(key, fmt):
        return "-" if row[key] is None else format(row[key], fmt)
    return (f"check batch {row['batch']} ({row['facts']} facts): efficacy {num('efficacy', '.2f')}, "
            f"neighbors unchanged {num('neighbors_unchanged', '.2f')}, drift {num('perplexity_drift', '+.1%')}")
