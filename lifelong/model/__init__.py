"""The model: loading and caching (GGUF, folders, built-ins), decoder recognition, hooks,
where a norm follows the edited matrix (`decoder.output_norm`), access to the edited matrices, the lean Llama forward, prompt and corpus tokenization, and
the session (a loaded model bound to a store's base and head).

May import the foundation (`errors`, `facts`, `policy`, `deltas`) and `store`; never
`edit`, `eval` or `ops`. Imports nothing on its own, so `import lifelong.model.X` pays
only for X.
"""
