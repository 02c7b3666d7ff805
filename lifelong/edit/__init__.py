"""The edit: tensors and a policy in, Δ factors out; never opens a store.

Preserved statistics (`stats`: C₀ and the null-space projector; `fisher`: the residual
Fisher), keys (`keys`), values (`values`: the reference loop and its step rules;
`values_fast` and `values_batched`: the cached paths), EAMET alignment (`alignment`), the
closed-form update (`solve`), MEMIT spreading over the layers (`batch.compute_edit`) and,
where a norm sits between an edited matrix and the stream (Gemma 3), the residual carried
through it (`output_space`).

May import the foundation (`errors`, `facts`, `policy`, `deltas`) and `model`; never
`store`, `eval` or `ops` (the push reads the store for it: `ops.inputs`).
"""
