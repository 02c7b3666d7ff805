"""`lifelong` command line: a thin layer over `lifelong.api`.

Domain errors become one message on stderr and the exit codes of DESIGN §2
(1 failed, 2 bad input, 3 gate rejected); `LIFELONG_DEBUG=1` shows tracebacks.
Commands that only read history (log, show, status) never import torch.
"""
from __future__ import annotations

import json
import os
import sys

import click

from lifelong.errors import LifelongError

CONTEXT = {"help_option_names": ["-h", "--help"]}


def _api():
    from lifelong import api  # torch is imported here, only by commands that need it

    if not sys.stderr.isatty():  # off a terminal: plain log lines only (DESIGN §2)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return api


def _store_path(value):
    from lifelong.store.location import store_path

    return store_path(value)


def _audit(verb: str, store, *args):
    """A read-only verb of `ops.audit` (log_rows, show, status, migrate): no torch import."""
    from lifelong.ops import audit

    return getattr(audit, verb)(_store_path(store), *args)


def describe_budget(b: dict) -> str:
    from lifelong.eval.budget import describe

    return describe(b)


def _log(msg: str) -> None:
    click.echo(msg, err=True)


def _progress_factory():
    """tqdm bars on a terminal; elsewhere a plain log line at most every 15 s."""
    if sys.stderr.isatty():
        def make(label):
            from tqdm import tqdm

            return tqdm(desc=label, unit="tok", leave=False).update

        return make

    def make_plain(label):
        import time

        state = {"n": 0, "last": time.monotonic()}

        def update(n):
            state["n"] += n
            if time.monotonic() - state["last"] >= 15:
                state["last"] = time.monotonic()
                _log(f"{label}: {state['n']} tokens")

        return update

    return make_plain


def _emit(data, as_json: bool, text) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    else:
        text(data)


store_option = click.option("--store", "store", envvar="LIFELONG_STORE", default=None,
                            help="store file [default: $LIFELONG_STORE or stores/default.h5]")
json_option = click.option("--json", "as_json", is_flag=True, help="machine-readable output")


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LifelongError as exc:
            if os.environ.get("LIFELONG_DEBUG"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(package_name="lifelong")
def main():
    """Lifelong knowledge editing: push fact batches into a model, audit them, roll them back.

    \b
    lifelong init                      # store for the built-in SmolLM2-135M
    lifelong push examples/facts.jsonl
    lifelong log
    lifelong rollback --to 0
    """


@main.command(context_settings=CONTEXT)
@click.option("--model", default="smollm2-135m", show_default=True,
              help="built-in name, a transformers directory or a .gguf file")
@click.option("--policy", default=None, help="policy name or file [default: the model's name]")
@click.option("--corpus", type=click.Path(dir_okay=False), default=None,
              help="preserved-knowledge text (plain text or JSONL with 'text') [default: model-sampled]")
@click.option("--heldout", type=click.Path(dir_okay=False), default=None,
              help="text to check perplexity on, kept apart from --corpus (plain text or JSONL with "
                   "'text') [default: model-sampled]")
@store_option
@json_option
def init(model, policy, corpus, heldout, store, as_json):
    """Create a store for a base model (refuses to overwrite one).

    Example: lifelong init --model smollm2-135m --store stores/prod.h5
    """
    path = _store_path(store)
    s = _api().init(path, model=model, policy=policy, corpus=corpus, heldout=heldout, log=_log, progress=_progress_factory())
    data = {"store": str(path), "info": {k: v for k, v in s.info.items() if k not in ("heldout",)}}
    _emit(data, as_json, lambda d: click.echo(f"created {d['store']}"))


def _print_push(d):
    click.echo(f"{'#':>3}  {'ok':2}  {'subject':28} {'target':18} prompt")
    for i, f in enumerate(d["facts"], 1):
        ok = "✓" if f["efficacy"] else "✗"
        click.echo(f"{i:>3}  {ok:2}  {f['subject'][:28]:28} {f['target'][:18]:18} {f['prompt']}")
    s = d["summary"]
    nb = s.get("neighbors_unchanged")
    click.echo(f"batch {d['batch']}{' (dry run, not stored)' if d['dry_run'] else ''}: "
               f"efficacy {s['efficacy']:.1%}"
               + (f", neighbors unchanged {nb:.1%}" if nb is not None else "")
               + f", {d['timings'].get('total', 0):.1f}s")
    if d.get("budget") and not d["dry_run"]:
        click.echo(describe_budget(d["budget"]))
    for w in d["warnings"]:
        click.echo(f"warning: {w}", err=True)


@main.command(context_settings=CONTEXT)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="compute and report, store nothing")
@click.option("--no-wait", is_flag=True, help="fail at once if another writer holds the store")
@store_option
@json_option
def push(file, dry_run, no_wait, store, as_json):
    """Validate FILE (JSONL facts), edit the model with it, record it as the next batch.

    Example: lifelong push batch_042.jsonl
    """
    rep = _api().push(_store_path(store), file, dry_run=dry_run, log=_log, wait=not no_wait)
    _emit(rep.to_dict(), as_json, _print_push)


@main.command(context_settings=CONTEXT)
@click.option("--to", "to", type=int, required=True, help="batch id to make the head (0 = base model)")
@click.option("--no-wait", is_flag=True)
@store_option
@json_option
def rollback(to, no_wait, store, as_json):
    """Make batch N the head; later batches become reverted (kept in the log).

    Example: lifelong rollback --to 37
    """
    res = _api().rollback(_store_path(store), to, wait=not no_wait)
    _emit(res, as_json, lambda d: click.echo(
        f"head {d['head_before']} -> {d['head']}; reverted: {', '.join(map(str, d['reverted'])) or 'none'}"))


@main.command(context_settings=CONTEXT)
@store_option
@json_option
def log(store, as_json):
    """The batch history: id, time, source, facts, efficacy, status, supersession."""
    rows = _audit("log_rows", store)

    def text(rows):
        if not rows:
            click.echo("no batches yet")
        for r in rows:
            eff = r.get("efficacy")
            eff_s = f"{eff:.0%}" if isinstance(eff, (int, float)) else "-"
            click.echo(f"{r['id']:>5}  {r['created'][:19]}  {r['status']:8}  {r['n_facts']:>4} facts "
                       f"{r['n_groups']:>4} groups ({r['merged']} merged)  eff {eff_s:>4}  "
                       f"{r['source']}  sha256:{r['sha256'][:12]}")
            for s in r.get("superseded", []):
                click.echo(f"       superseded {s}")

    _emit(rows, as_json, text)


@main.command(context_settings=CONTEXT)
@click.argument("batch", type=int)
@store_option
@json_option
def show(batch, store, as_json):
    """Everything recorded about batch N."""
    d = _audit("show", store, batch)

    def text(d):
        click.echo(f"batch {d['id']}  {d['status']}  {d['created']}  {d['source']}  sha256:{d['sha256']}")
        for i, (f, e) in enumerate(zip(d["facts"], d["efficacy"])):
            click.echo(f"  {i:>3} {'✓' if e else '✗'} {f['prompt'].replace('{}', f['subject'])} -> {f['target']}")
        for g in d["groups"]:
            if len(g["facts"]) > 1 or g["replaces"]:
                click.echo(f"  group {g['subject']!r}: facts {g['facts']} replaces {g['replaces']}")
        for s in d["superseded"]:
            click.echo(f"  superseded {s}")
        click.echo(f"  metrics {json.dumps(d['metrics'])}")
        click.echo(f"  timings {json.dumps(d['timings'])}")

    _emit(d, as_json, text)


@main.command(context_settings=CONTEXT)
@store_option
@json_option
def status(store, as_json):
    """Where the store lives, its model, head, counts, size and format version."""
    d = _audit("status", store)

    def text(d):
        click.echo(f"store    {d['store']} (format {d['format_version']}, {d['size_bytes'] / 1e6:.1f} MB)")
        click.echo(f"model    {d['model']} ({d['architecture']}), policy {d['policy']}, layers {d['layers']}")
        click.echo(f"head     {d['head']}; batches {d['batches']} {d['by_status']}; live facts {d['live_facts']}")
        click.echo(f"budget   {describe_budget(d['budget'])}")

    _emit(d, as_json, text)


@main.command(context_settings=CONTEXT)
@store_option
@json_option
def migrate(store, as_json):
    """Rewrite an older store at this version's format (each migration is recorded in the store)."""
    res = _audit("migrate", store)
    _emit(res, as_json, lambda d: click.echo(
        f"{d['store']}: migrated from format {d['migrated_from']} to {d['format_version']}"
        if d["migrated_from"] else f"{d['store']}: already at format {d['format_version']}"))


@main.command(context_settings=CONTEXT)
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--at", type=int, default=None, help="export the state after batch N without moving head")
@click.option("--format", "fmt", type=click.Choice(["merged", "peft"]), default="merged", show_default=True,
              help="merged: a transformers checkpoint; peft: a LoRA adapter over the unedited base model")
@store_option
@json_option
def export(out, at, fmt, store, as_json):
    """Write the model at head as a transformers checkpoint, or the edit as a PEFT LoRA adapter
    (loadable without lifelong)."""
    res = _api().export(_store_path(store), out, at=at, log=_log, format=fmt)

    def text(d):
        click.echo(f"exported head {d['head']} to {d['out']}")
        if d.get("format") == "peft":
            ranks = ", ".join(f"{l}: r={v['rank']}" for l, v in d["layers"].items())
            click.echo(f"LoRA adapter ({ranks}) over the base model at {d['base_model']}")

    _emit(res, as_json, text)


@main.command("eval", context_settings=CONTEXT)
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@click.option("--prefixes", type=int, default=10, show_default=True,
              help="also score under N sampled 5-token prefixes (0: bare prompts only)")
@store_option
@json_option
def eval_(file, prefixes, store, as_json):
    """Strict metrics for FILE, or retention of every live fact when FILE is omitted."""
    res = _api().evaluate(_store_path(store), file, prefixes=prefixes, log=_log)

    def text(d):
        for k, v in d["summary"].items():
            if k == "budget":
                click.echo(describe_budget(v))
            else:
                click.echo(f"{k:22} {v:.4f}" if isinstance(v, float) else f"{k:22} {v}")

    _emit(res, as_json, text)


@main.command(context_settings=CONTEXT)
@click.argument("prompts", nargs=-1, required=True)
@click.option("--tokens", type=int, default=6, show_default=True, help="new tokens per prompt")
@click.option("--at", type=int, default=None, help="ask the model as it was after batch N")
@store_option
@json_option
def ask(prompts, tokens, at, store, as_json):
    """Greedy completions of PROMPTS by the edited model (a quick look, not a metric).

    Example: lifelong ask "The mother tongue of Danielle Darrieux is"
    """
    res = _api().complete(_store_path(store), list(prompts), max_new_tokens=tokens, at=at, log=_log)
    def text(rows):
        for r in rows:  # one line per prompt: show line breaks of the completion as ⏎
            click.echo(f"{r['prompt']} →{r['completion'].replace(chr(10), ' ⏎ ')}")

    _emit(res, as_json, text)


@main.command(context_settings=CONTEXT)
@click.option("--inbox", required=True, type=click.Path(file_okay=False),
              help="folder of pending *.jsonl fact files (done/ and failed/ are made inside it)")
@click.option("--gate", "gates", multiple=True, metavar="NAME=VALUE",
              help="override one policy gate for this run, e.g. --gate min_efficacy=0.8 (repeatable)")
@click.option("--no-wait", is_flag=True, help="exit 1 at once if another refresh holds the inbox (or the store)")
@store_option
@json_option
def refresh(inbox, gates, no_wait, store, as_json):
    """Push every pending *.jsonl in INBOX (name order) through the policy gates.

    A batch that fails a gate is rolled back (status rejected). Each file moves to
    INBOX/done/ or INBOX/failed/ with NAME.report.json beside it. Exit 0 all passed,
    3 a batch was rejected, 2 a file was invalid, 1 a push failed.

    Example: lifelong refresh --inbox /srv/inbox --store stores/prod.h5
    """
    from lifelong.ops import refresh as refresh_mod

    overrides = refresh_mod.parse_gates(gates)  # bad --gate: exit 2 before anything is touched
    rep = refresh_mod.refresh(_store_path(store), inbox, gates=overrides, wait=not no_wait, log=_log)
    if as_json:
        _emit(rep.to_dict(), True, None)
    sys.exit(rep.exit_code)


def _layer_list(_ctx, _param, value):
    """'3,4,5' -> [3, 4, 5] (a click callback: a bad list is a usage error, exit 2)."""
    if value is None:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give layer numbers separated by commas, e.g. 3,4,5,6,7") from None


def _print_locate(d):
    sug, compare = d["suggested_layers"], d["compare"]
    click.echo(f"{'layer':>5}  {'hidden':>8}  {'mlp(w=' + str(d['window']) + ')':>9}")
    for row in d["layers"]:
        mark = "  suggested" if row["layer"] in sug else ""
        click.echo(f"{row['layer']:>5}  {row['hidden']:>8.4f}  {row['mlp']:>9.4f}{mark}")
    click.echo(f"indirect effect at the last subject token, mean of {d['traced']} known facts "
               f"(checked {d['checked']} of {d['in_file']}); p(answer) clean {d['p_clean']:.3f}, "
               f"corrupted {d['p_corrupted']:.3f}; {d['seconds']:.0f}s")
    click.echo(f"suggested edit layers: {','.join(map(str, sug))} "
               f"({d['edit_layers']} consecutive with the largest MLP effect)")
    if compare:
        ranks = ", ".join(f"{layer}: #{r}" for layer, r in compare["ranks"].items())
        run = f"run rank {compare['run_rank']} of {compare['runs']}, " if compare["run_rank"] else ""
        click.echo(f"layers {','.join(map(str, compare['layers']))}: MLP effect sum {compare['sum']:.4f} "
                   f"(best {compare['best_sum']:.4f} at {','.join(map(str, compare['best_run']))}); "
                   f"{run}per-layer rank of {d['n_layers']}: {ranks}")
    if d["report"]:
        click.echo(f"report {d['report']}, heatmap {d['heatmap']}")


@main.command(context_settings=CONTEXT)
@click.option("--model", default="smollm2-135m", show_default=True,
              help="built-in name, a transformers directory or a .gguf file")
@click.option("--facts", "facts", required=True, type=click.Path(dir_okay=False),
              help="facts to trace: ROME's known-facts JSON (an array of {\"prompt\": \"Vinson Massif is "
                   "located in the continent of\", \"subject\": \"Vinson Massif\", \"attribute\": "
                   "\"Antarctica\"}, as its known_1000.json) or a lifelong fact file (answer: target)")
@click.option("--n", "n", type=int, default=50, show_default=True,
              help="trace the first N facts the model knows (its top prediction is the answer)")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="write the report to OUT.md and the heatmap to OUT.png [default: print only]")
@click.option("--window", type=int, default=10, show_default=True, help="layers per restored MLP window")
@click.option("--samples", type=int, default=10, show_default=True, help="noise samples averaged per fact")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the noise")
@click.option("--grid-facts", type=int, default=5, show_default=True,
              help="facts traced at every position (the heatmap); the rest only at the last subject token")
@click.option("--edit-layers", type=int, default=5, show_default=True,
              help="how many consecutive layers to suggest")
@click.option("--compare-layers", callback=_layer_list, default=None, metavar="L1,L2,...",
              help="say where these layers rank, e.g. a policy's 3,4,5,6,7")
@json_option
def locate(model, facts, n, out, window, samples, seed, grid_facts, edit_layers, compare_layers, as_json):
    """Causal tracing (ROME): which layers recall the facts a model knows, and which MLP
    layers to edit. Needs no store.

    Example: lifelong locate --model smollm2-135m --facts known_1000.json --n 50 --out reports/locate
    """
    res = _api().locate(model, facts, n=n, out=out, window=window, samples=samples, seed=seed,
                        edit_layers=edit_layers, compare_layers=compare_layers, grid_facts=grid_facts, log=_log)
    _emit(res, as_json, _print_locate)


@main.group(context_settings=CONTEXT)
def policy():
    """Editing policies: a starting one for a model nobody has tuned."""


def _print_suggest(d):
    click.echo(d["text"].rstrip())
    if d["out"]:
        click.echo(f"wrote {d['out']} ({d['seconds']:.0f}s); use it: lifelong init --model ... --policy {d['out']}")
    from lifelong.ops.suggest import check_line

    check = d["check"] or {}
    if check.get("calibrated_step") is not None:
        click.echo(f"check: value step calibrated {check['step']:g} -> {check['calibrated_step']:g} "
                   f"(values took {check['value_steps']:.2f} steps at the first)")
    for row in check.get("batches", []):
        click.echo(check_line(row))


@policy.command(context_settings=CONTEXT)
@click.option("--model", required=True, help="built-in name, a transformers directory or a .gguf file")
@click.option("--facts", "facts", required=True, type=click.Path(dir_okay=False),
              help="facts the model may know, to trace (as `locate --facts`: ROME's known_1000.json or a fact file)")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="write the policy here (YAML)")
@click.option("--n", "n", type=int, default=20, show_default=True, help="known facts to trace and measure")
@click.option("--layers", callback=_layer_list, default=None, metavar="L1,L2,...",
              help="edit these layers instead of tracing for them")
@click.option("--edit-layers", type=int, default=5, show_default=True, help="how many consecutive layers")
@click.option("--corpus", type=click.Path(dir_okay=False), default=None,
              help="plain text for C0 (as `init --corpus`) [default: the model samples its own]")
@click.option("--check", type=int, default=0, show_default=True,
              help="push this many facts of --check-facts in two batches into a temporary store and report; "
                   "the first batch also calibrates the value step")
@click.option("--check-facts", type=click.Path(dir_okay=False), default=None, help="a fact file for --check")
@json_option
def suggest(model, facts, out, n, layers, edit_layers, corpus, check, check_facts, as_json):
    """Suggest a starting policy for MODEL: edit layers by causal tracing, step size,
    mom2 weight and null-space threshold carried over from the shipped SmolLM2 policy by
    measured rules; the file's header says how each value was derived.

    Example: lifelong policy suggest --model my-model-dir --facts known_1000.json --out policies/my-model.yaml --check 20 --check-facts dev.jsonl
    """
    res = _api().suggest(model, facts, out=out, n=n, layers=layers, edit_layers=edit_layers, corpus=corpus,
                         check=check, check_facts=check_facts, log=_log)
    _emit(res, as_json, _print_suggest)


if __name__ == "__main__":
    main()
