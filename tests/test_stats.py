"""C₀ = E[kkᵀ] (`edit.stats.second_moments`) against a float64 reference on a tiny model: padding
is left out, uneven sequences weigh per token, and the float32 batch products lose nothing
that matters."""
from __future__ import annotations

import pytest
import torch

from lifelong.edit.stats import second_moments
from lifelong.model.loading import load_model, resolve_model


def test_second_moments_equal_a_float64_reference_per_token(tiny_llama_dir):
    model, tok = load_model(resolve_model(str(tiny_llama_dir)), log=lambda *a: None)
    names = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(5, tok.vocab_size, (n,), generator=g).tolist() for n in (7, 12, 3, 12, 9)]
    got, count = second_moments(model, names, seqs, batch=2)
    assert count == sum(len(s) for s in seqs)
    want = {n: torch.zeros_like(got[n]) for n in names}
    for s in seqs:                                  # one unpadded sequence at a time
        seen = {}
        handles = [model.get_submodule(n).register_forward_pre_hook(
            lambda _m, a, n=n: seen.__setitem__(n, a[0][0].double())) for n in names]
        with torch.no_grad():
            model(input_ids=torch.tensor([s]))
        for h in handles:
            h.remove()
        for n in names:
            want[n] += seen[n].T @ seen[n]
    for n in names:
        ref = want[n] / count
        assert got[n].dtype == torch.float64
        assert torch.allclose(got[n], ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


def test_sampled_text_comes_in_even_batches_of_the_asked_size(tiny_llama_dir, monkeypatch):
    """Sampling in one batch or several gives as many sequences, each opener plus `length`
    tokens, and the same ones again for the same seed."""
    from lifelong.model import corpus
    from lifelong.model.loading import load_model, resolve_model

    model, tok = load_model(resolve_model(str(tiny_llama_dir)), log=lambda *a: None)
    calls = []
    real = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(k["input_ids"].shape[0]) or real(*a, **k))
    monkeypatch.setattr(corpus, "SAMPLE_BATCH", 4)
    seqs = corpus.sample_sequences(model, tok, 7, 3, seed=1)
    assert set(calls) == {4, 3}                              # 7 rows at most 4 at once: 4 and 3
    assert len(seqs) == 7
    firsts = [tok(o, add_special_tokens=True)["input_ids"] for o in corpus.OPENERS[:7]]
    assert [len(s) - len(f) for s, f in zip(seqs, firsts)] == [3] * 7
    assert corpus.sample_sequences(model, tok, 7, 3, seed=1) == seqs


@pytest.mark.parametrize("arch", ["tiny_llama_dir", "tiny_gpt2_dir", "tiny_gemma_dir"])
def test_sampling_with_a_preallocated_cache_equals_the_growing_one(arch, request, monkeypatch):
    """The sampler writes keys and values in place (StaticCache) instead of growing the cache
    at every step: the same logits, so the same text for the same seed, on every architecture
    (left-padded openers of different lengths included)."""
    from lifelong.model import corpus
    from lifelong.model.loading import load_model, resolve_model

    model, tok = load_model(resolve_model(str(request.getfixturevalue(arch))), log=lambda *a: None)
    made = []
    real = corpus.preallocated_cache
    monkeypatch.setattr(corpus, "preallocated_cache", lambda m, n: made.append(real(m, n)) or made[-1])
    static = corpus.sample_sequences(model, tok, 9, 12, seed=5)
    assert made and all(c is not None for c in made)
    monkeypatch.setattr(corpus, "preallocated_cache", lambda m, n: None)
    assert corpus.sample_sequences(model, tok, 9, 12, seed=5) == static


def test_second_moments_read_off_sampling_equal_a_pass_over_the_sampled_text(tiny_llama_dir):
    """init without a corpus reads C₀ off the sampling passes (KV cache, one token per step):
    the same E[kkᵀ] as a full pass over the sampled sequences without their last token, which
    the sampler never feeds back."""
    from lifelong.edit.stats import Moments, second_moments
    from lifelong.model.corpus import sample_sequences
    from lifelong.model.hooks import hooks
    from lifelong.model.loading import load_model, resolve_model

    model, tok = load_model(resolve_model(str(tiny_llama_dir)), log=lambda *a: None)
    names = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    acc = Moments(names)
    with hooks(model, acc.spec()):
        seqs = sample_sequences(model, tok, 5, 6, seed=3, batch=3, on_step=acc.feed)
    full, count = second_moments(model, names, [s[:-1] for s in seqs])
    assert acc.count == count == sum(len(s) - 1 for s in seqs)
    for n in names:
        assert torch.allclose(acc.means()[n], full[n], rtol=1e-4, atol=1e-6 * float(full[n].abs().max()))


@pytest.mark.parametrize("d, blocks", [(7, 4), (64, 4), (10, 1), (3, 3)])
def test_gram_from_upper_bands_is_xtx(d, blocks):
    from lifelong.edit.stats import gram

    x = torch.randn(50, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
    assert torch.allclose(gram(x, blocks), x.t() @ x, rtol=1e-12, atol=1e-12)


def test_bfloat16_passes_keep_the_sums_in_float32(tiny_llama_dir):
    """Under bfloat16 autocast the model's matmuls run in bfloat16 but C₀'s products do not:
    C₀ equals the float32 sums of the (bfloat16-made) keys the hooks saw, and stays within a
    few 1e-3 of the float32 pass."""
    from lifelong.model.precision import matmuls

    model, tok = load_model(resolve_model(str(tiny_llama_dir)), log=lambda *a: None)
    name = "model.layers.1.mlp.down_proj"
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(5, tok.vocab_size, (12,), generator=g).tolist() for _ in range(6)]
    full, _ = second_moments(model, [name], seqs, batch=6)
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with matmuls("bfloat16", model):
        half, count = second_moments(model, [name], seqs, batch=6)
    handle.remove()
    keys = torch.cat(seen).double()
    assert seen[0].dtype == torch.bfloat16                  # the forward did run in bfloat16
    assert torch.allclose(half[name], keys.T @ keys / count, rtol=1e-5, atol=1e-7)
    err = float((half[name] - full[name]).norm() / full[name].norm())
    assert 0 < err < 2e-2


def test_precision_auto_resolves_to_a_concrete_one():
    from lifelong.model.precision import resolve

    cpu = torch.device("cpu")
    assert resolve("auto", cpu) in ("float32", "bfloat16")
    assert resolve("float32", cpu) == "float32"
    with pytest.raises(ValueError, match="precision 'half'"):
        resolve("half", cpu)


def test_bfloat16_block_gives_the_float32_weights_back(tiny_gemma_dir):
    """The linear weights are cast once for the block and the very same float32 parameters
    (tied head included) are back afterwards, also when the block raises."""
    from lifelong.model.precision import matmuls

    model, _ = load_model(resolve_model(str(tiny_gemma_dir)), log=lambda *a: None)
    before = {n: p for n, p in model.named_parameters()}
    copies = {n: p.detach().clone() for n, p in before.items()}
    with pytest.raises(RuntimeError, match="inside"):
        with matmuls("bfloat16", model):
            assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
            raise RuntimeError("inside")
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert all(torch.equal(after[n], copies[n]) for n in before)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
