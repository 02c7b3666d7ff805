"""EAMET embedding alignment against the residual bank of the whole edit history.

The bank holds (k_j, δ_j) for every live group: k_j the key at the last edited layer,
δ_j its optimized residual. A new group's δ is pulled so that its cosine structure to
the bank's residuals matches its key's cosine structure to the bank's keys:
  KL(p ‖ q), p = softmax_j(cos(k, k_j)/τ), q = softmax_j(cos(δ, δ_j)/τ)
  MSE = Σ_{top-M j by key cosine} w_j (cos(k, k_j) − cos(δ, δ_j))², w = softmax over top-M.
Everything per step is one (n × d) mat-vec, so 10⁵ entries stay cheap.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class ResidualBank:
    keys: torch.Tensor                      # (n, d_in) unit-normalised keys at layer L
    deltas: torch.Tensor                    # (n, d_model) unit-normalised residuals
    refs: list = field(default_factory=list)  # (batch id, group index) per row; -1 batch = this push

    @classmethod
    def empty(cls, d_in: int, d_model: int) -> "ResidualBank":
        return cls(torch.zeros(0, d_in), torch.zeros(0, d_model), [])

    def __len__(self) -> int:
        return self.keys.shape[0]

    def add(self, key: torch.Tensor, delta: torch.Tensor, ref) -> None:
        self.keys = torch.cat([self.keys, F.normalize(key.detach().float().cpu(), dim=-1)[None]])
        self.deltas = torch.cat([self.deltas, F.normalize(delta.detach().float().cpu(), dim=-1)[None]])
        self.refs.append(ref)

    def extend(self, keys: torch.Tensor, deltas: torch.Tensor, refs: list) -> None:
        self.keys = torch.cat([self.keys, F.normalize(keys.float().cpu(), dim=-1)])
        self.deltas = torch.cat([self.deltas, F.normalize(deltas.float().cpu(), dim=-1)])
        self.refs.extend(refs)

    def objective(self, key: torch.Tensor, tau: float, top_m: int, lambda_kl: float,
                  lambda_mse: float, device) -> "AlignmentTerm | None":
        """The alignment term for one group's key, or None when the bank is empty."""
        if len(self) == 0 or (lambda_kl == 0 and lambda_mse == 0):
            return None
        cos_k = self.keys @ F.normalize(key.float().cpu(), dim=-1)          # (n,)
        m = min(top_m, len(self))
        top = torch.topk(cos_k, m).indices                                  # (m,)
        return AlignmentTerm(
            deltas=self.deltas.to(device),
            log_p=F.log_softmax(cos_k / tau, dim=-1).to(device),
            top=top.to(device),
            cos_top=cos_k[top].to(device),
            w_top=torch.softmax(cos_k[top] / tau, dim=-1).to(device),
            tau=tau, lambda_kl=lambda_kl, lambda_mse=lambda_mse,
        )


@dataclass
class AlignmentTerm:
    deltas: torch.Tensor   # (n, d_model) unit residuals of the bank
    log_p: torch.Tensor    # (n,) log softmax of key cosines / τ
    top: torch.Tensor      # (m,) indices of the top-M key cosines
    cos_top: torch.Tensor  # (m,)
    w_top: torch.Tensor    # (m,)
    tau: float
    lambda_kl: float
    lambda_mse: float

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        # cos(δ, ·) is undefined at δ = 0, where every optimization starts: its gradient there
        # is ~1/eps, which would fill Adam's second moment and freeze δ for the whole run.
        if not bool(delta.detach().norm() > 0):
            return delta.new_zeros(())  # no gradient either
        cos_d = self.deltas @ F.normalize(delta, dim=-1)                    # (n,)
        log_q = F.log_softmax(cos_d / self.tau, dim=-1)
        kl = torch.sum(self.log_p.exp() * (self.log_p - log_q))             # KL(p ‖ q)
        mse = torch.sum(self.w_top * (self.cos_top - cos_d[self.top]) ** 2)
        return self.lambda_kl * kl + self.lambda_mse * mse
