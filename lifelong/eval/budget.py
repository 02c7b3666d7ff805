"""How many more edits the model takes before held-out perplexity drifts past the gate.

Every push measures the drift of the model at its head (perplexity on the store's held-out
text over the base model's, minus 1) and records it with the number of live facts then.
Over the first few hundred edits drift grows about linearly with the live edits, but it
compounds: on SmolLM2-135M with the shipped policy WikiText drift doubles about every 200
edits up to 1250 (bench/reports/long_horizon.md, 2026-12-07). So the store's slope is the
steeper of the least-squares line through the origin over the active batches' measurements
and the recent slope (from the last measurement at least RECENT edits back to now), and the
budget is what is left to the policy's max_perplexity_drift at that slope: still an upper
bound once drift compounds. Pure: no torch, so `lifelong status` shows it without loading a
model.
"""
from __future__ import annotations

from lifelong.store import history

MIN_POINTS = 1   # a slope needs one measurement after at least one edit
RECENT = 100     # edits the recent slope spans at least, so that one batch's noise does not set it


def drift_points(records: list[history.BatchRecord]) -> list[tuple[int, float]]:
    """(live facts, drift) measured by each active batch's push, in id order."""
    return [(int(r.metrics["live_facts"]), float(r.metrics["perplexity_drift"]))
            for r in history.active(records)
            if r.metrics.get("perplexity_drift") is not None and r.metrics.get("live_facts") is not None]


def edit_budget(records: list[history.BatchRecord], max_drift: float, now: tuple[int, float] | None = None,
                measured_by: str | None = None) -> dict:
    """The drift at the head and the edits left before `max_drift` at the store's slope.

    now: (live facts, drift) measured just now (`eval`, a refresh gate); else the head
    batch's own measurement. Returns {"live_facts", "drift", "measured_by", "slope_per_100",
    "max_drift", "edits_left", "points"}; slope and edits_left are None until a push has
    measured drift, and edits_left is None where drift has not grown (no limit in sight)."""
    points = drift_points(records)
    head = history.head(records)
    if now is None and points and head and history.active(records)[-1].metrics.get("perplexity_drift") is not None:
        now, measured_by = points[-1], measured_by or f"push of batch {head}"
    if now is not None:
        points = [p for p in points if p[0] != now[0]] + [now]
    fit = [(x, y) for x, y in points if x > 0]
    slope = sum(x * y for x, y in fit) / sum(x * x for x, _ in fit) if len(fit) >= MIN_POINTS else None
    recent = recent_slope(fit, now)
    if slope is not None and recent is not None:
        slope = max(slope, recent)
    live, drift = now if now is not None else (len(history.live_facts(records)), None)
    left = None
    if slope is not None and slope > 0 and drift is not None:
        left = max(0, int((max_drift - drift) / slope))
    return {"live_facts": live, "drift": drift, "measured_by": measured_by if now is not None else None,
            "slope_per_100": None if slope is None else 100 * slope, "max_drift": max_drift,
            "edits_left": left, "points": len(fit)}


def recent_slope(points: list[tuple[int, float]], now: tuple[int, float] | None) -> float | None:
    """Drift per edit from the latest measurement at least RECENT live facts before `now` to now."""
    if now is None:
        return None
    earlier = [p for p in points if p[0] <= now[0] - RECENT]
    if not earlier:
        return None
    x0, y0 = max(earlier)
    return (now[1] - y0) / (now[0] - x0)


def describe(b: dict) -> str:
    """One line for people: 'drift +2.1 % at 100 live facts (push of batch 4); ...'."""
    if b["drift"] is None:
        return "edit budget: no drift measured yet (pushes measure it; `lifelong eval` too)"
    s = f"drift {b['drift']:+.1%} at {b['live_facts']} live facts ({b['measured_by']})"
    if b["slope_per_100"] is None:
        return s + "; no slope yet"
    s += f"; slope {b['slope_per_100']:+.2%} per 100 edits over {b['points']} measurement(s)"
    if b["edits_left"] is None:
        return s + f"; no limit in sight for max_perplexity_drift {b['max_drift']:.0%}"
    return s + f"; about {b['edits_left']} more edits before max_perplexity_drift {b['max_drift']:.0%}"
