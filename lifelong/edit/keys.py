"""Keys and subject outputs of one batch, kept current through MEMIT's spreading.

Before the update of each edited layer l, spreading needs every group's mean key at l
(the input of the edited matrix at the last subject token, over its facts × contexts)
and mean h^L at the subject (over its facts' bare prompts), on the model as the updates
of the layers before l left it. Rows end at the last subject token: nothing after it
reaches those positions.

The first pass, before any update, reads the keys of every edited layer at once, h^L,
and the input of the first edited layer. The update of layer l changes nothing before
l, so the pass after it starts at l from that cached input, runs only l … L, and keeps
the input of the next edited layer for the pass after. A decoder values_fast does not
recognise gets a whole pass after each update instead. The cached inputs cost
rows × tokens × d_model floats (about 30 kB per fact and context on SmolLM2).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lifelong.errors import EditFailed
from lifelong.model.prompts import Row, make_row, pad_rows
from lifelong.model.hooks import _Stop, _hidden, hooks
from lifelong.policy import layer_name
from lifelong.model.decoder import recognise
from lifelong.policy import module_name


@dataclass
class _Part:
    """One batch of rows, run together."""

    ids: torch.Tensor             # (n, T) right-padded
    mask: torch.Tensor            # (n, T)
    pos: torch.Tensor             # (n,) last subject token
    owner: torch.Tensor           # (n,) group of each row (CPU)
    bare: torch.Tensor            # (n,) bool: the bare-prompt context (CPU)
    inputs: torch.Tensor | None = None   # (n, T, d) input of the decoder layer the next pass starts at


def write_units(groups) -> torch.Tensor:
    """The group of each write unit: one unit per fact of every group. A merged group's facts
    share one δ but not one key: the words before the subject, and how the subject splits into
    tokens at the start of a prompt ("Athens, ..." is 'At'+'hens', "... of Athens" one token),
    give each fact's prompt its own key, and a mean over them writes δ fully at none."""
    return torch.tensor([gi for gi, g in enumerate(groups) for _ in g.facts], dtype=torch.long)


def _rows_for(tok, groups, contexts: list[str]):
    """Prompt rows ending at the last subject token: every fact × context of every group,
    each owned by its write unit (the fact)."""
    rows, owner, is_bare = [], [], []
    for unit, fact in enumerate(f for g in groups for f in g.facts):     # write_units' order
        for ci, ctx in enumerate(contexts):
            r = make_row(tok, ctx, fact.prompt, fact.subject, None)
            if r.subject_pos < 0:
                raise EditFailed(f"could not locate the subject's last token in {fact.render()!r}")
            rows.append(Row(r.ids[: r.subject_pos + 1], r.subject_pos + 1, r.subject_pos))
            owner.append(unit)
            is_bare.append(ci == 0)
    return rows, owner, is_bare


class BatchKeys:
    """keys[l]: (n_units, d_in) mean key at edited layer l over each write unit's contexts;
    out: (n_units, d_model) h^L at the subject of each unit's bare prompt; both for the
    model's current weights once `after_update` was called for each layer updated since
    construction. Units are the groups' facts in order (`write_units`)."""

    def __init__(self, model, tok, groups, contexts: list[str], template: str, layers: list[int],
                 batch: int = 64):
        self.model, self.template, self.layers = model, template, list(layers)
        self.n = sum(len(g.facts) for g in groups)                         # write units
        device = next(model.parameters()).device
        rows, owner, is_bare = _rows_for(tok, groups, contexts)
        self.parts = []
        for start in range(0, len(rows), batch):
            part = rows[start : start + batch]
            ids, mask = pad_rows(part, tok.pad_token_id, device)
            self.parts.append(_Part(ids, mask, torch.tensor([r.subject_pos for r in part], device=device),
                                    torch.tensor(owner[start : start + batch]),
                                    torch.tensor(is_bare[start : start + batch])))
        arch = recognise(model, layer_name(template, self.layers[-1]))
        longest = max((p.ids.shape[1] for p in self.parts), default=0)
        # a sliding window shorter than a row attends differently from the one mask the cached passes use
        self.arch = None if isinstance(arch, str) or (arch.window is not None and longest > arch.window) else arch
        self.cached: int | None = None     # decoder layer whose input the parts hold
        self.keys: dict[int, torch.Tensor] = {}
        self.out = torch.empty(0)
        self._pass(None)

    def fork(self) -> "BatchKeys":
        """A copy that stays as this one is now while this one follows later updates: a second
        spreading from the same start needs no new pass. Passes replace tensors, never write
        into them, so the copy shares them."""
        twin = object.__new__(BatchKeys)
        twin.__dict__.update(self.__dict__, keys=dict(self.keys), parts=[replace(p) for p in self.parts])
        return twin

    def after_update(self, layer: int) -> None:
        """Bring keys and outputs up to date after edited layer `layer` was updated (and
        nothing else since the last pass)."""
        self._pass(layer if self.arch is not None and layer == self.cached else None)

    @torch.no_grad()
    def _pass(self, start: int | None) -> None:
        """Recompute from decoder layer `start`'s cached input, or from the tokens (None)."""
        L = self.layers[-1]
        read = [l for l in self.layers if start is None or l > start]      # keys that can change
        nxt = next((l for l in self.layers if start is None or l > start), None)
        keep = nxt if self.arch is not None and nxt is not None and nxt <= L else None   # L too: realized shares
        key_sum = {l: None for l in read}
        out_sum = None
        for part in self.parts:
            ar = torch.arange(len(part.pos), device=part.pos.device)
            got = {}

            def grab(l):
                def pre(_m, args):
                    got[l] = args[0][ar, part.pos].float().cpu()
                return pre

            spec = {module_name(self.template, l): ("pre", grab(l)) for l in read}
            if start is None:
                if keep is not None:
                    spec[layer_name(self.template, keep)] = ("pre", lambda _m, args: got.update(inputs=args[0]))

                def post(_m, args, output):
                    if keep == L:      # one edited layer: its input is cached here (one hook per module)
                        got["inputs"] = args[0]
                    got["h"] = _hidden(output)
                    raise _Stop

                spec[layer_name(self.template, L)] = ("post", post)
                with hooks(self.model, spec):
                    try:
                        self.model(input_ids=part.ids, attention_mask=part.mask, use_cache=False)
                    except _Stop:
                        pass
            else:
                T = part.ids.shape[1]
                j = torch.arange(T, device=part.ids.device)
                allowed = ((j[None, :] <= j[:, None])[None] & part.mask.bool()[:, None, :])[:, None]  # (n, 1, T, T)
                mask = self.arch.mask(allowed, part.inputs.dtype)
                position_ids = j[None].expand(len(part.pos), T)
                with hooks(self.model, spec):
                    h = part.inputs
                    if keep is not None:
                        h = self.arch.run(h, start, keep, mask, position_ids)
                        got["inputs"] = h
                    got["h"] = self.arch.run(h, keep if keep is not None else start, L + 1, mask, position_ids)
            part.inputs = got.get("inputs")
            for l in read:
                key_sum[l] = _add(key_sum[l], part.owner, got[l], self.n)
            h = got["h"][ar, part.pos].float().cpu()[part.bare]
            out_sum = _add(out_sum, part.owner[part.bare], h, self.n)
        self.cached = keep
        for l in read:
            self.keys[l] = key_sum[l] / self._count(None)[:, None]
        self.out = out_sum / self._count(True)[:, None]

    def _count(self, bare: bool | None) -> torch.Tensor:
        """Rows per unit: all of them (None) or the bare-prompt ones (True)."""
        own = torch.cat([p.owner if bare is None else p.owner[p.bare] for p in self.parts])
        return torch.zeros(self.n).index_add_(0, own, torch.ones(len(own)))


def group_mean(x: torch.Tensor, unit_group: torch.Tensor, n: int) -> torch.Tensor:
    """(u, d) per write unit -> (n, d) mean over each group's units."""
    count = torch.zeros(n, dtype=x.dtype).index_add_(0, unit_group, torch.ones(len(unit_group), dtype=x.dtype))
    return _add(None, unit_group, x, n) / count[:, None]


def _add(total: torch.Tensor | None, owner: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """total + per-owner sums of the rows of x (n_rows, d) -> (n, d)."""
    total = torch.zeros(n, x.shape[1], dtype=x.dtype) if total is None else total
    return total.index_add_(0, owner, x)
