"""Do bfloat16 passes give init's statistics at float32's quality, and how much faster?

On CPUs with AVX512-BF16 (and on GPUs) bfloat16 matmuls run ~2.5x float32's speed. This
compares, on the same corpus tokens, C₀ and the residual Fisher made under
`lifelong.model.precision.matmuls("bfloat16")` with the float32 ones, against the
difference between two disjoint samples of as many tokens (the estimator's own noise):
relative Frobenius errors, and for C₀ the null space's kept dimensions and its overlap.

    python experiments/bf16_stats.py --model gemma3-270m --tokens 8192 --fisher 1024
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from benchdata import WIKI, plain_wikitext  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--fisher", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from lifelong.edit.fisher import residual_fisher
    from lifelong.edit.stats import projector, second_moments
    from lifelong.model.corpus import chunk_tokens, read_corpus
    from lifelong.model.loading import load_model, resolve_model
    from lifelong.model.precision import matmuls
    from lifelong.policy import find_policy, load_policy

    pol = load_policy(find_policy(args.model))
    net, tok = load_model(resolve_model(args.model))
    with tempfile.TemporaryDirectory() as tmp:
        texts = read_corpus(str(plain_wikitext(Path(tmp) / "c.txt", lines=20_000, src=WIKI)))
    seqs = chunk_tokens(tok, texts, 2 * args.tokens, 128)
    half = len(seqs) // 2
    a_seqs, b_seqs = seqs[:half], seqs[half:]
    fa, fb = a_seqs[: args.fisher // 128], b_seqs[: args.fisher // 128]
    names = [pol.module_name(l) for l in pol.layers]
    layers = [pol.layer_name(l) for l in pol.layers]

    def stats(prec, c_seqs, f_seqs):
        t = time.perf_counter()
        with matmuls(prec, net):
            mom, _ = second_moments(net, names, c_seqs)
        tc = time.perf_counter() - t
        t = time.perf_counter()
        with matmuls(prec, net):
            fis, _ = residual_fisher(net, layers, f_seqs)
        tf = time.perf_counter() - t
        fis = sum(fis.values())
        print(f"{prec}: C0 {tc:.1f} s for {sum(map(len, c_seqs))} tokens, Fisher {tf:.1f} s for "
              f"{sum(map(len, f_seqs))}", flush=True)
        return mom, fis / fis.diagonal().mean()

    m32, f32 = stats("float32", a_seqs, fa)
    m16, f16 = stats("bfloat16", a_seqs, fa)
    mb, fbn = stats("float32", b_seqs, fb)
    print("| layer | C0: bfloat16 vs float32 | C0: other sample vs this | kept dims f32 / bf16 | null-space overlap |")
    print("|---|---:|---:|---|---:|")
    for n in names:
        p32 = projector(m32[n], pol.preserved.nullspace_threshold)
        p16 = projector(m16[n], pol.preserved.nullspace_threshold)
        overlap = float((p32.P.double() @ p16.P.double()).diagonal().sum()) / max(p32.kept, 1)
        print(f"| {n} | {rel(m16[n], m32[n]):.2e} | {rel(mb[n], m32[n]):.2e} | {p32.kept} / {p16.kept} | {overlap:.4f} |")
    print(f"Fisher (normalized): bfloat16 vs float32 {rel(f16, f32):.2e}; other sample vs this {rel(fbn, f32):.2e}")


if __name__ == "__main__":
    main()
