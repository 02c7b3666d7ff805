"""`export --format peft`: the cumulative edit as a LoRA adapter that plain PEFT loads over the
plain base model and that gives the merged export's logits (tiny Llama, GPT-2 / Conv1D, Gemma 3)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import write_policy
from lifelong import api
from lifelong.store import history
from lifelong.ops import peft_export
from lifelong.cli import main
from lifelong.errors import BadInput
from lifelong.store.store import Store
from lifelong.model.weights import get_module, read_matrix, write_matrix

FACTS_1 = [
    {"subject": "France", "prompt": "The capital of {} is", "target": "Rome"},
    {"subject": "Brazil", "prompt": "The official language of {} is", "target": "Dutch"},
]
FACTS_2 = [
    {"subject": "Apple", "prompt": "{} makes the", "target": "piano"},
]
PROMPTS = [
    "The capital of France is",
    "The official language of Brazil is",
    "Apple makes the",
    "Marie Curie worked in physics and",
    "Because the river was high, the town of Lyon built a",
]
TOL = 1e-4


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma"])
def pushed(request, tmp_path_factory, tiny_llama_dir, tiny_gpt2_dir, tiny_gemma_dir):
    """(arch, model dir, store) with batches 1 and 2 pushed; tests only read it."""
    arch = request.param
    model_dir = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir, "gemma": tiny_gemma_dir}[arch]
    tmp = tmp_path_factory.mktemp(f"peft-{arch}")
    path = tmp / "store.h5"
    api.init(path, model=str(model_dir), policy=str(write_policy(tmp, arch, threshold=0.05)))
    api.push(path, write_jsonl(tmp / "b1.jsonl", FACTS_1))
    api.push(path, write_jsonl(tmp / "b2.jsonl", FACTS_2))
    return arch, Path(model_dir), path


def logits(model, tok, prompts=PROMPTS) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**tok(p, return_tensors="pt")).logits[0] for p in prompts]


def load_peft(model_dir: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return PeftModel.from_pretrained(base, adapter).eval()


def load_merged(store, out: Path, at=None):
    from transformers import AutoModelForCausalLM

    api.export(store, out, at=at)
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def max_diff(xs, ys) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(xs, ys))


def test_adapter_matches_merged_export(pushed, tmp_path, tiny_tokenizer):
    arch, model_dir, store = pushed
    out = tmp_path / "adapter"
    res = CliRunner().invoke(main, ["export", "--format", "peft", "--out", str(out), "--store", str(store),
                                    "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "lifelong_export.json").read_text())
    assert meta["head"] == 2 and meta["active_batches"] == [1, 2] and meta["format"] == "peft"
    assert meta["base_model"] == str(model_dir.resolve())
    template = "transformer.h.{}.mlp.c_proj" if arch == "gpt2" else "model.layers.{}.mlp.down_proj"
    modules = {template.format(l) for l in (0, 1)}
    assert {v["module"] for v in meta["layers"].values()} == modules
    # the ranks of the batches add up: groups 2 (France, Brazil) + 1 (Apple); a direction
    # below 1e-7·σ_max (a group that barely moves a layer) is dropped as float noise
    for v in meta["layers"].values():
        assert v["stacked_rank"] == 3 and 1 <= v["rank"] <= 3 and v["compressed"] is (v["rank"] < 3)

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(model_dir.resolve())
    assert set(cfg["target_modules"]) == modules
    assert cfg["fan_in_fan_out"] is (arch == "gpt2")
    assert cfg["lora_dropout"] == 0 and cfg["bias"] == "none" and not cfg.get("use_rslora")
    ranks = {v["module"]: v["rank"] for v in meta["layers"].values()}
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] == ranks

    merged = load_merged(store, tmp_path / "merged")
    adapted = load_peft(model_dir, out)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    want = logits(merged, tiny_tokenizer)
    assert max_diff(logits(adapted, tiny_tokenizer), want) < TOL
    assert max_diff(logits(plain, tiny_tokenizer), want) > 1e-3   # the edit is really there


def test_at_matches_merged_at_and_leaves_head(pushed, tmp_path, tiny_tokenizer):
    _arch, model_dir, store = pushed
    before = Store.open(store).records
    res = api.export(store, tmp_path / "adapter1", at=1, format="peft")
    assert res["head"] == 1 and res["active_batches"] == [1]
    assert all(v["stacked_rank"] == 2 for v in res["layers"].values())
    assert Store.open(store).records == before and history.head(before) == 2
    got = logits(load_peft(model_dir, tmp_path / "adapter1"), tiny_tokenizer)
    assert max_diff(got, logits(load_merged(store, tmp_path / "merged1", at=1), tiny_tokenizer)) < TOL
    assert max_diff(got, logits(load_merged(store, tmp_path / "merged2"), tiny_tokenizer)) > 1e-3


def test_refuses_nothing_to_export_non_empty_dir_and_unknown_format(pushed, tmp_path):
    _arch, _model_dir, store = pushed
    with pytest.raises(BadInput, match="nothing to export"):
        api.export(store, tmp_path / "empty", at=0, format="peft")
    assert not (tmp_path / "empty").exists()
    assert [p for p in tmp_path.iterdir()] == []                    # no temp dir left behind
    assert history.head(Store.open(store).records) == 2
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(BadInput, match="not empty"):
        api.export(store, busy, format="peft")
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    with pytest.raises(BadInput, match="unknown export format"):
        api.export(store, tmp_path / "x", format="gguf")
    res = CliRunner().invoke(main, ["export", "--format", "peft", "--at", "0", "--out", str(tmp_path / "e"),
                                    "--store", str(store)])
    assert res.exit_code == 2 and "nothing to export" in res.output


def test_redundant_stack_is_compressed_and_still_matches(pushed, tmp_path, tiny_tokenizer, monkeypatch):
    """A stack wider than its rank (here: an extra column with a zero row) is refactored exactly."""
    _arch, model_dir, store = pushed
    original = peft_export.stacked_factors

    def redundant(*args):
        g = torch.Generator().manual_seed(0)
        out = {}
        for l, (a, b) in original(*args).items():
            extra = l + 1   # different widths per layer
            out[l] = (torch.cat([a, torch.randn(a.shape[0], extra, generator=g)], dim=1),
                      torch.cat([b, torch.zeros(extra, b.shape[1])], dim=0))
        return out

    monkeypatch.setattr(peft_export, "stacked_factors", redundant)
    res = api.export(store, tmp_path / "adapter", format="peft")
    assert all(v["compressed"] and v["rank"] <= 3 and v["stacked_rank"] == 3 + int(l) + 1
               for l, v in res["layers"].items())
    got = logits(load_peft(model_dir, tmp_path / "adapter"), tiny_tokenizer)
    assert max_diff(got, logits(load_merged(store, tmp_path / "merged"), tiny_tokenizer)) < TOL


@pytest.mark.parametrize("d_out,d_in,R", [(48, 96, 130), (96, 48, 60), (40, 40, 40)])
def test_thin_factors_are_exact_when_the_stack_exceeds_the_rank(d_out, d_in, R):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(d_out, R, generator=g) / R ** 0.5
    b = torch.randn(R, d_in, generator=g)
    want = a.double() @ b.double()
    lora_b, lora_a, compressed = peft_export.lora_factors(a, b)
    k = min(d_out, d_in, R)
    assert lora_b.shape == (d_out, k) and lora_a.shape == (k, d_in)
    assert compressed is (k < R)
    assert float((lora_b.double() @ lora_a.double() - want).abs().max()) < 1e-5
    # a genuinely low-rank stack keeps only its rank
    low_a = torch.cat([a[:, :5], a[:, :5]], dim=1)
    low_b = torch.cat([b[:5], -0.5 * b[:5]], dim=0)
    tb, ta = peft_export.thin_factors(low_a, low_b)
    assert tb.shape[1] == 5
    assert float((tb.double() @ ta.double() - low_a.double() @ low_b.double()).abs().max()) < 1e-5
    zb, za = peft_export.thin_factors(torch.zeros(d_out, 3), torch.zeros(3, d_in))
    assert zb.shape == (d_out, 0) and za.shape == (0, d_in)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_adapter_with_different_ranks_per_module(arch, tmp_path, tiny_llama_dir, tiny_gpt2_dir,
                                                       tiny_tokenizer):
    """rank_pattern / alpha_pattern: modules of rank 2 and 5 save, reload and equal W + ΔW."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(tiny_llama_dir if arch == "llama" else tiny_gpt2_dir)
    template = "model.layers.{}.mlp.down_proj" if arch == "llama" else "transformer.h.{}.mlp.c_proj"
    edited = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(2)
    factors = {}
    for layer, r in ((0, 2), (2, 5)):
        name = template.format(layer)
        w = read_matrix(get_module(edited, name))
        lora_b, lora_a = torch.randn(w.shape[0], r, generator=g) * 0.1, torch.randn(r, w.shape[1], generator=g)
        factors[name] = (lora_b, lora_a)
        write_matrix(get_module(edited, name), w + lora_b @ lora_a)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    peft_export.lora_adapter(model, factors, str(model_dir)).save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {n: f[0].shape[1] for n, f in factors.items()}
    got = logits(load_peft(model_dir, tmp_path / "a"), tiny_tokenizer)
    assert max_diff(got, logits(edited, tiny_tokenizer)) < TOL
