"""NAS's value-norm anchoring (`edit.anchoring`): on small matrices, and through a push on the
tiny models (an anchor nothing fits under leaves the weights as they were)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lifelong import api
from lifelong.edit.anchoring import SKIP_FACTOR, anchor_values
from lifelong.store.store import Store
from helpers import write_jsonl
from test_pipeline import FACTS_1


def test_anchored_values_have_the_anchor_norm_in_their_own_direction():
    g = torch.Generator().manual_seed(0)
    v0 = torch.randn(6, 8, generator=g, dtype=torch.float64)
    du = torch.randn(6, 8, generator=g, dtype=torch.float64) * torch.tensor([0.1, 0.5, 1, 2, 4, 8], dtype=torch.float64)[:, None]
    norms = (v0 + du).norm(dim=-1)
    anchor = float(norms.median())
    out, kept, got_norms = anchor_values(du, v0, anchor)
    assert torch.equal(got_norms, norms)
    assert torch.equal(kept, norms <= SKIP_FACTOR * anchor) and kept.any() and not kept.all()
    v = v0 + out
    assert torch.allclose(v[kept].norm(dim=-1), torch.full((int(kept.sum()),), anchor, dtype=torch.float64))
    cos = torch.nn.functional.cosine_similarity(v[kept], (v0 + du)[kept], dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos))
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))        # skipped: nothing to write


def test_a_push_whose_values_all_exceed_the_anchor_writes_nothing(tiny_store, tmp_path):  # noqa: F811
    """Every value over 2 × the anchor: each group is reported unwritten with its value norm,
    the weights stay the base's, and rollback is exact."""
    facts = write_jsonl(tmp_path / "b1.jsonl", FACTS_1)
    probe = api.push(tiny_store, facts, dry_run=True)
    norms = [g["value_norm"] for g in probe.groups]
    assert all(n > 0 for n in norms)
    rep = api.push(tiny_store, facts, policy_overrides={"value_norm_anchor": min(norms) / (2 * SKIP_FACTOR)})
    assert all(g.get("written") is False for g in rep.groups)
    assert sum("value_norm_anchor" in w for w in rep.warnings) == len(rep.groups)
    st = Store.open(tiny_store)
    arrays = st.batch_arrays(st.records[-1].id)
    for k in [k for k in arrays if k.endswith("/A")]:
        b = arrays[k.replace("/A", "/B")]
        assert np.abs(arrays[k] @ b).max() < 1e-6 * max(1.0, float(np.abs(b).max()))
    api.rollback(tiny_store, 0)


def test_values_within_twice_an_anchor_at_their_mean_are_all_written(tiny_store, tmp_path):  # noqa: F811
    facts = write_jsonl(tmp_path / "b1.jsonl", FACTS_1)
    probe = api.push(tiny_store, facts, dry_run=True)
    anchor = float(np.mean([g["value_norm"] for g in probe.groups]))
    rep = api.push(tiny_store, facts, policy_overrides={"value_norm_anchor": anchor})
    assert not any("value_norm_anchor" in w for w in rep.warnings)
    assert [g["value_norm"] for g in rep.groups] == pytest.approx([g["value_norm"] for g in probe.groups], rel=1e-4)
