"""Measuring a model (DESIGN §6): strict teacher-forced metrics and perplexity (`metrics`),
per-fact scores (`scoring`), fluency (`fluency`), and the meter that measures any head of
a store with one loaded model, used by `eval` and the refresh gates (`meter`), and causal
tracing (`tracing`: which layers recall the facts a model knows, for `lifelong locate`).

May import the foundation, `store` and `model`; never `edit` or `ops`.
"""
