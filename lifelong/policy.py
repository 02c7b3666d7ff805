"""Editing policies: every tunable number of an edit, typed, validated and documented.

A policy is one YAML or TOML file per model family (``policies/*.yaml``), nested by
concern: which MLP output matrices are edited (top level), the MEMIT `contexts`, how
target `values` are optimized, EAMET `alignment`, MEMIT-Merge `merging`, the closed-form
`update` (AlphaEdit projection or the C₀-weighted solve), the `preserved` statistics
`init` estimates, and the `gates` that ``refresh`` checks (DESIGN §4, §7). Shapes are
never chosen here: they are read from the weights.

    policy = load_policy(find_policy("smollm2-135m"))
    policy.values.steps, policy.update.project, policy.alignment.enabled
    ablated = policy.with_overrides(alignment={"enabled": False}, gates={"min_efficacy": 0.8})
    policy.stored_json()   # the flat form the store keeps; policy_from_json reads it back
    policy.digest()        # sha256 hex of the canonical flat JSON; each batch record keeps it

Every problem is raised as `PolicyError` whose message names the file (or the
origin of the data) and the dotted field, one line per problem.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic_core
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lifelong.errors import PolicyError

Precision = Literal["float32", "bfloat16", "auto"]   # of init's passes; lifelong.model.precision resolves it

__all__ = [
    "Gates",
    "Policy",
    "load_policy",
    "find_policy",
    "available_policies",
    "policy_from_json",
    "POLICY_SUFFIXES",
]

POLICY_SUFFIXES = (".yaml", ".yml", ".toml")
"""File name endings `load_policy` reads and `find_policy` looks up, in lookup order."""

_SHIPPED_POLICIES = Path(__file__).resolve().parent / "policies"   # package data; the repository's policies/ links here

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class Gates(BaseModel):
    """Refresh gates (DESIGN §2 `refresh`, §6): a batch failing any of them is rolled back.

    All values are fractions in [0, 1]; `refresh --gate NAME=VALUE` overrides one for a run.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    min_efficacy: Fraction = Field(
        0.9,
        description="Minimum strict efficacy of the pushed batch: fraction of its facts whose "
        "target tokens are all the argmax under teacher forcing (fraction, 0-1).",
    )
    max_neighbor_drop: Fraction = Field(
        0.10,
        description="Maximum drop, versus before the push, of the fraction of neighbor prompts "
        "whose teacher-forced argmax tokens are unchanged from the base model (fraction, 0-1).",
    )
    max_retention_drop: Fraction = Field(
        0.05,
        description="Maximum drop, versus before the push, of the strict efficacy of the active "
        "facts of earlier batches (fraction, 0-1).",
    )
    max_perplexity_drift: Fraction = Field(
        0.05,
        description="Maximum relative perplexity increase on held-out text versus the base "
        "model: ppl_head / ppl_base - 1 (fraction, 0-1).",
    )


_STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Contexts(BaseModel):
    """MEMIT's context templates: prefixes sampled from the model, put before each prompt."""

    model_config = _STRICT

    n_prefixes: int = Field(
        5, ge=0,
        description="Number of prefixes sampled from the model and put before the prompt when "
        "computing keys and values (count); N_FP = n_prefixes + 1 with the bare prompt.",
    )
    prefix_tokens: int = Field(5, ge=1, description="Length of each sampled prefix (tokens, including its seed word).")


class Values(BaseModel):
    """How each group's target residual δ is optimized at the last edited layer L (DESIGN §4.3)."""

    model_config = _STRICT

    steps: int = Field(25, ge=1, description="Maximum optimization steps of the residual δ per group (count).")
    merged_steps: int | None = Field(
        None, ge=1,
        description="Optimization steps of a group of several facts (one subject's merged value): "
        "its δ must serve every fact at once and needs a longer path, which normalized steps "
        "walk at a fixed pace. None = steps.",
    )
    optimizer: Literal["adam", "normalized"] = Field(
        "adam",
        description="How δ steps: 'adam' (MEMIT/AlphaEdit: Adam with learning rate lr), or "
        "'normalized' (each step moves δ by step_size·‖h^L‖ straight down its gradient). "
        "Adam moves every coordinate by about lr per step whatever its gradient, so δ fills "
        "directions the target does not need; normalized steps reach the same target with "
        "a δ about 2.5x shorter on SmolLM2, and a shorter δ is a smaller weight update, but "
        "one the update writes less of: pair it with update.rescale_max and update.min_realized "
        "(the SmolLM2 policy does; bench/reports/quality_notes.md).",
    )
    lr: float = Field(0.5, gt=0, description="Adam learning rate of the δ optimization (dimensionless; optimizer adam only).")
    step_size: float = Field(
        0.08, gt=0,
        description="Length of each normalized step, as a fraction of ‖h^L‖ (ratio; optimizer normalized only).",
    )
    metric: Literal["euclidean", "fisher"] = Field(
        "euclidean",
        description="What a normalized step's length is measured in: 'euclidean' (‖δ‖), or "
        "'fisher' (√(δᵀF̃δ), F̃ the Fisher of the LM loss with respect to the edited layers' "
        "outputs on init's corpus, scaled to mean eigenvalue 1; lifelong/edit/fisher.py). "
        "Ordinary text's loss grows by about ½·rᵀFr per token for a residual r written into "
        "those outputs, and F is far from isotropic: measured in it, δ reaches its target "
        "through directions text is less sensitive to. 'fisher' needs optimizer normalized "
        "and a store whose init estimated F (init does when the policy asks for it).",
    )
    clamp_norm_factor: float = Field(
        0.75, gt=0,
        description="‖δ‖ is clamped to at most this factor times ‖h^L‖, the norm of the residual "
        "stream after layer L at the last subject token (ratio).",
    )
    kl_factor: float = Field(
        0.0625, ge=0,
        description="Weight of MEMIT's essence term: KL of the next-token distribution on "
        "'{subject} is a' against the unedited model (loss weight).",
    )
    weight_decay: float = Field(0.5, ge=0, description="Weight of the penalty ‖δ‖² / ‖h^L‖² (loss weight).")
    early_stop_loss: float = Field(
        0.05, ge=0,
        description="Stop optimizing once the target negative log-likelihood falls below this "
        "(nats per target, averaged over contexts).",
    )


class Alignment(BaseModel):
    """EAMET embedding alignment of each δ against the residual bank of all live edits."""

    model_config = _STRICT

    enabled: bool = Field(
        True,
        description="Add EAMET's alignment terms (KL and MSE between key and residual cosine "
        "similarities against the residual bank); off = plain MEMIT value optimization. "
        "The weights below stay in the file when off, for the day it is turned on.",
    )
    tau: float = Field(0.07, gt=0, description="Softmax temperature τ over cosine similarities (dimensionless).")
    top_m: int = Field(50, ge=1, description="M: number of bank entries, nearest by key cosine, used in the MSE term (count).")
    lambda_kl: float = Field(2.0, ge=0, description="λ_KL: weight of the alignment KL term (loss weight).")
    lambda_mse: float = Field(8.0, ge=0, description="λ_MSE: weight of the alignment MSE term (loss weight).")


class Merging(BaseModel):
    """MEMIT-Merge: one value per subject."""

    model_config = _STRICT

    same_subject: bool = Field(
        True,
        description="Give facts with the same subject one shared residual, optimized on the sum "
        "of their losses (MEMIT-Merge), including still-active facts from earlier batches.",
    )


class Update(BaseModel):
    """The closed-form weight update per layer and how the batch is spread over the layers."""

    model_config = _STRICT

    project: bool = Field(
        True,
        description="Project the update onto the null space of the preserved knowledge "
        "(AlphaEdit); off = MEMIT-style update with mom2_weight · E[kkᵀ] as ridge.",
    )
    alpha: float = Field(
        10.0, gt=0,
        description="Ridge α of the projected update: (K_pK_pᵀP + KKᵀP + αI)⁻¹ (same units as "
        "KKᵀ, i.e. squared key norm; project true only).",
    )
    mom2_weight: float = Field(
        15000.0, ge=0,
        description="λ of the MEMIT-style update: weight of the mean second moment E[kkᵀ] of "
        "preserved keys (dimensionless; multiplies a mean, not a sum; project false only).",
    )
    hold_earlier: bool = Field(
        False,
        description="MEMIT-style update (project false only): earlier edits' keys enter its solve "
        "too, Σ k_p k_pᵀ as in AlphaEdit, so their outputs are held in place; with a small "
        "mom2_weight the update then writes each residual almost exactly at the least change of "
        "preserved keys' outputs. Off = MEMIT as published.",
    )
    min_realized: float = Field(
        0.0, ge=0, lt=1,
        description="Groups whose first spreading pass writes less than this share of their δ "
        "at L are left unwritten (ratio; 0 = off): their keys have almost no room outside "
        "preserved knowledge and earlier edits (a subject such as 'France'), and forcing "
        "them through costs more than the batch's other groups together. The batch is spread "
        "again with their keys held in place; push warns about each.",
    )
    rescale_max: float = Field(
        1.0, ge=1,
        description="With > 1, the batch is spread a second time with each group's δ divided "
        "by the share the first pass wrote of it, by at most this factor (ratio; 1 = off): a "
        "just-long-enough δ (optimizer normalized) then holds once written, without the "
        "remainder-chasing of further sweeps.",
    )


class Preserved(BaseModel):
    """The preserved-knowledge statistics `init` estimates once per store."""

    model_config = _STRICT

    nullspace_threshold: float = Field(
        2e-2, gt=0,
        description="Eigenvalues of the MEAN second moment E[kkᵀ] below this span the null space "
        "kept by the projector (squared key units; init reports the dimensions kept).",
    )
    corpus_tokens: int = Field(
        20000, ge=100,
        description="Tokens of preserved-knowledge text `init` reads from --corpus to estimate "
        "E[kkᵀ] (tokens; well above the key dimension d₀: too few underestimate its small "
        "eigenvalues, the directions the update leans on). Also what the model samples without "
        "a corpus file, unless sampled_tokens says otherwise.",
    )
    sampled_tokens: int | None = Field(
        None, ge=100,
        description="Tokens the model samples itself for E[kkᵀ] when init is given no corpus "
        "file (tokens; None = corpus_tokens). Sampling costs a generation step per token, so a "
        "policy whose corpus_tokens is large for a truer C₀ can keep `init` quick without a file.",
    )
    fisher_tokens: int = Field(
        32768, ge=128,
        description="Corpus tokens init runs backward through for the residual Fisher (values.metric "
        "fisher only; tokens, at most the corpus it read). Each costs a forward and a backward "
        "pass: ~1 minute per 10k tokens on a 2-core CPU for SmolLM2-135M.",
    )
    precision: Precision = Field(
        "float32",
        description="Matmul precision of init's passes over the text (C₀, the Fisher, sampling). "
        "bfloat16 runs ~2x faster where the hardware has it (AVX512-BF16/AMX CPUs, GPUs) and moves "
        "C₀ by ~3e-3 relative; auto = bfloat16 there, float32 elsewhere. The store records which ran.",
    )


class Experiment(BaseModel):
    """Knobs no shipped policy uses, kept for the benchmarks that measure them. A policy file
    cannot set them; a benchmark passes them as overrides (push's policy_overrides)."""

    model_config = _STRICT

    sweeps: int = Field(
        1, ge=1,
        description="Passes over the edited layers per batch (count). Each further pass spreads "
        "again what is still missing at L. 1: MEMIT/AlphaEdit as published.",
    )
    preserve_weight: float = Field(
        0.0, ge=0,
        description="λ_p of the projected update: adds λ_p·P·E[kkᵀ] to the solve, penalising what "
        "the null space still holds of the preserved keys' energy; 0 = AlphaEdit as published.",
    )
    stop_margin: float | None = Field(
        None,
        description="Also stop a value once every target token is the most probable token, by at "
        "least this many nats over the runner-up, in every context (ENCORE's most-probable early "
        "stopping, with a margin). None: off.",
    )
    stop_patience: int = Field(
        1, ge=1,
        description="With stop_margin: the margin must hold for this many consecutive steps "
        "before a value stops (ENCORE uses 2-4). 1: at the first step it holds.",
    )
    value_norm_anchor: float | None = Field(
        None, gt=0,
        description="NAS's anchor: each value v* = v₀ + δ at the last edited layer (v₀ its MLP output "
        "at the subject) is rescaled to this norm, and an edit whose ‖v*‖ exceeds twice it is not "
        "written (push reports value_norm per group). The mean ‖v*‖ of edits pushed on the unedited "
        "model. None: off.",
    )
    frobenius_weight: float = Field(
        0.0, ge=0,
        description="λ_F of the MEMIT-style update: adds λ_F·(tr E[kkᵀ]/d)·I to its solve "
        "(ENCORE's Frobenius term, in units of C₀'s mean eigenvalue), which bounds ‖Δ‖ most "
        "where C₀ leaves keys room. 0: off.",
    )
    repair_weight: float = Field(
        0.0, ge=0,
        description="μ of the MEMIT-style update: adds μ·tr((D + Δ) E[kkᵀ] (D + Δ)ᵀ) to its "
        "objective, D the change earlier batches left in the matrix, so each push also pulls the "
        "preserved keys' outputs back toward the base model's (LyapLock's repair term, with a "
        "fixed weight; dimensionless like mom2_weight). 0: off.",
    )


class Policy(BaseModel):
    """All settings of an edit for one model family (DESIGN §4, §7), nested by concern.

    Norm-type settings are relative to a quantity of the same space (‖δ‖ against
    ‖h^L‖), so that they carry over between model sizes better than absolute ones.
    Single-field rules are field constraints and validators, so one pass reports
    every bad field; rules that need several fields live in `_check_together`, and a
    setting given for a choice the policy does not make is listed by `unused()`.
    """

    model_config = _STRICT

    name: str = Field(min_length=1, description="Short name of the policy, normally the file's stem (e.g. 'smollm2-135m').")
    model: str = Field(min_length=1, description="Free text: which model(s) this policy was tuned for or taken from.")
    source: str = Field(
        min_length=1,
        description="Where the numbers come from: paper and table/appendix, or 'tuned here on ...'.",
    )
    module_template: str = Field(
        "model.layers.{}.mlp.down_proj",
        description="Dotted module path of the MLP output matrix W^l, with '{}' standing for the "
        "layer index (Llama/Qwen/Mistral: 'model.layers.{}.mlp.down_proj'; GPT-2: "
        "'transformer.h.{}.mlp.c_proj'; GPT-J: 'transformer.h.{}.mlp.fc_out').",
    )
    layers: list[Annotated[int, Field(ge=0)]] = Field(
        min_length=1,
        description="Edited layers 𝓛 (0-based layer indices), strictly increasing; the last one "
        "is L, where the target value is optimized.",
    )
    contexts: Contexts = Field(default_factory=Contexts, description="MEMIT's context templates.")
    values: Values = Field(default_factory=Values, description="Optimization of each group's target residual δ.")
    alignment: Alignment = Field(default_factory=Alignment, description="EAMET alignment against the residual bank.")
    merging: Merging = Field(default_factory=Merging, description="MEMIT-Merge: one value per subject.")
    update: Update = Field(default_factory=Update, description="The closed-form update and the spreading over layers.")
    preserved: Preserved = Field(default_factory=Preserved, description="The statistics init estimates once.")
    gates: Gates = Field(default_factory=Gates, description="Refresh gates checked after each pushed batch.")
    experiment: Experiment = Field(
        default_factory=Experiment, description="Benchmark-only knobs (overrides only, never in a file)."
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_names(cls, data: Any) -> Any:
        """Flat names (`FLAT`: the store's form, `Policy(steps=8)`) into their sections;
        policy files are held to the nested form by `_validate`."""
        return _nested(data) if isinstance(data, Mapping) else data

    @field_validator("layers")
    @classmethod
    def _layers_increasing(cls, layers: list[int]) -> list[int]:
        bad = [(a, b) for a, b in zip(layers, layers[1:]) if b <= a]
        if bad:
            raise ValueError(
                f"must be strictly increasing, got {layers} ({bad[0][1]} follows {bad[0][0]})"
            )
        return layers

    @field_validator("module_template")
    @classmethod
    def _template_has_one_slot(cls, template: str) -> str:
        problem = _template_problem(template)
        if problem:
            raise ValueError(problem)
        return template

    @model_validator(mode="after")
    def _check_together(self) -> "Policy":
        """Checks that involve several fields; every problem is reported, one per line."""
        problems = []
        if not self.update.project and self.update.mom2_weight <= 0:
            problems.append(
                "update.mom2_weight: must be > 0 when update.project is false (the MEMIT-style update "
                "(KKᵀ + λ·E[kkᵀ])⁻¹ is singular without it)"
            )
        if self.values.metric == "fisher" and self.values.optimizer != "normalized":
            problems.append(
                "values.metric: 'fisher' measures normalized steps; it needs values.optimizer "
                "'normalized' (Adam's steps have no metric)"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def unused(self) -> list[str]:
        """'section.field: why' for each setting given (not defaulted) that the policy's own
        choices never read, e.g. values.lr with optimizer normalized; `init` warns about each."""
        v, u, p = self.values, self.update, self.preserved
        rules = [
            (v, "lr", v.optimizer != "adam", "applies to values.optimizer adam only"),
            (v, "step_size", v.optimizer != "normalized", "applies to values.optimizer normalized only"),
            (v, "merged_steps", not self.merging.same_subject, "applies to merged groups (merging.same_subject)"),
            (u, "alpha", not u.project, "applies to update.project true only"),
            (u, "mom2_weight", u.project, "applies to update.project false only"),
            (u, "hold_earlier", u.project, "applies to update.project false only"),
            (p, "fisher_tokens", v.metric != "fisher", "applies to values.metric fisher only"),
        ]
        names = {id(sec): name for name, sec in self if isinstance(sec, BaseModel)}
        return [f"{names[id(sec)]}.{field}: {why}; ignored" for sec, field, off, why in rules
                if off and field in sec.model_fields_set]

    # -- derived values -------------------------------------------------------------

    def step_budget(self, n_facts: int) -> int:
        """Optimization steps of a group of n_facts facts."""
        v = self.values
        return v.merged_steps if n_facts > 1 and v.merged_steps is not None else v.steps

    @property
    def n_contexts(self) -> int:
        """N_FP: contexts per prompt, the bare prompt plus `contexts.n_prefixes` prefixed ones."""
        return self.contexts.n_prefixes + 1

    def module_name(self, layer: int) -> str:
        """Dotted path of the edited module at `layer`, e.g. 'model.layers.4.mlp.down_proj'."""
        return module_name(self.module_template, layer)

    def layer_name(self, layer: int) -> str:
        """Dotted path of the decoder layer holding the edited module, e.g. 'model.layers.4'."""
        return layer_name(self.module_template, layer)

    # -- copies and identity --------------------------------------------------------

    def with_overrides(self, **fields: Any) -> "Policy":
        """A validated copy with `fields` replaced; raises PolicyError naming each bad field.

        A section may be a partial mapping (``values={"steps": 10}`` keeps the other value
        settings), and a field may be named by its flat name (``steps=10``, ``align=False``,
        ``sweeps=2``: the names of `FLAT`, as the store and the benchmarks' commands spell them).
        """
        data = self.model_dump()
        for key, value in _nested(fields).items():
            if isinstance(value, BaseModel):
                value = value.model_dump()
            if isinstance(value, Mapping) and isinstance(data.get(key), dict):
                value = {**data[key], **value}
            data[key] = value
        return _validate(data, f"policy {self.name!r} with overrides", files=False)

    def flat(self) -> dict[str, Any]:
        """Every setting under its flat name, in `FLAT` order: the form the store keeps
        (format 3 and before), so a policy's stored JSON and digest do not depend on how the
        file groups its settings."""
        data = self.model_dump(mode="python")
        return {flat: (data[path[0]] if len(path) == 1 else data[path[0]][path[1]]) for flat, path in FLAT}

    def file_data(self) -> dict[str, Any]:
        """The policy as a policy file holds it (nested, no experiment section): what
        `yaml.safe_dump` writes for `load_policy` to read back (the benchmarks' init files)."""
        return self.model_dump(mode="json", exclude={"experiment"})

    def stored_json(self) -> str:
        """The JSON the store keeps: `flat()`, compact, as pydantic writes it."""
        return pydantic_core.to_json(self.flat()).decode("utf-8")

    def digest(self) -> str:
        """sha256 (hex) of the canonical JSON: the flat settings, keys sorted, no spaces."""
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()

    def canonical_json(self) -> str:
        """The JSON text `digest` hashes: every flat setting, sorted keys, compact separators."""
        return json.dumps(json.loads(self.stored_json()), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# The flat name of every setting and where it lives, in the order the store has always
# written them (before policies were nested by concern).
FLAT: list[tuple[str, tuple[str, ...]]] = [
    ("name", ("name",)), ("model", ("model",)), ("source", ("source",)),
    ("module_template", ("module_template",)), ("layers", ("layers",)),
    ("n_prefixes", ("contexts", "n_prefixes")), ("prefix_tokens", ("contexts", "prefix_tokens")),
    ("steps", ("values", "steps")), ("merged_steps", ("values", "merged_steps")),
    ("optimizer", ("values", "optimizer")), ("lr", ("values", "lr")), ("step_size", ("values", "step_size")),
    ("value_metric", ("values", "metric")), ("fisher_tokens", ("preserved", "fisher_tokens")),
    ("clamp_norm_factor", ("values", "clamp_norm_factor")), ("kl_factor", ("values", "kl_factor")),
    ("weight_decay", ("values", "weight_decay")), ("early_stop_loss", ("values", "early_stop_loss")),
    ("stop_margin", ("experiment", "stop_margin")), ("stop_patience", ("experiment", "stop_patience")),
    ("frobenius_weight", ("experiment", "frobenius_weight")), ("repair_weight", ("experiment", "repair_weight")),
    ("value_norm_anchor", ("experiment", "value_norm_anchor")),
    ("align", ("alignment", "enabled")), ("tau", ("alignment", "tau")), ("top_m", ("alignment", "top_m")),
    ("lambda_kl", ("alignment", "lambda_kl")), ("lambda_mse", ("alignment", "lambda_mse")),
    ("merge_same_subject", ("merging", "same_subject")),
    ("project", ("update", "project")), ("mom2_weight", ("update", "mom2_weight")),
    ("hold_earlier", ("update", "hold_earlier")), ("preserve_weight", ("experiment", "preserve_weight")),
    ("alpha", ("update", "alpha")), ("sweeps", ("experiment", "sweeps")),
    ("min_realized", ("update", "min_realized")), ("rescale_max", ("update", "rescale_max")),
    ("nullspace_threshold", ("preserved", "nullspace_threshold")),
    ("corpus_tokens", ("preserved", "corpus_tokens")), ("sampled_tokens", ("preserved", "sampled_tokens")),
    ("stats_precision", ("preserved", "precision")), ("gates", ("gates",)),
]
_NESTED_PATH = {flat: path for flat, path in FLAT if len(path) == 2}
SECTIONS = {"contexts": Contexts, "values": Values, "alignment": Alignment, "merging": Merging,
            "update": Update, "preserved": Preserved, "experiment": Experiment}


def _nested(data: Mapping) -> dict:
    """`data` with flat names (`FLAT`) moved into their sections; nested data passes unchanged."""
    out: dict = {}
    for key, value in data.items():
        if key in _NESTED_PATH:
            section, field = _NESTED_PATH[key]
            out.setdefault(section, {})
            if isinstance(out[section], dict):
                out[section][field] = value
        elif key in SECTIONS and isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


# -- module paths ---------------------------------------------------------------------


def module_name(template: str, layer: int) -> str:
    """The edited module at `layer`: 'model.layers.{}.mlp.down_proj' -> 'model.layers.7.mlp.down_proj'."""
    return template.replace("{}", str(layer))


def layer_name(template: str, layer: int) -> str:
    """Decoder layer holding the edited module: 'model.layers.{}.mlp.down_proj' -> 'model.layers.7'."""
    return template.split("{}")[0] + str(layer)


# -- validation and error messages ---------------------------------------------------


def _template_problem(template: str) -> str | None:
    """Why `template` is not a dotted module path with exactly one '{}' segment, or None."""
    if template.count("{}") != 1:
        return f"must contain '{{}}' (the layer index) exactly once, got {template!r}"
    segments = template.split(".")
    if "{}" not in segments:
        return f"'{{}}' must be a whole dotted segment (like 'layers.{{}}.mlp'), got {template!r}"
    if any(seg != "{}" and not re.fullmatch(r"\w+", seg) for seg in segments):
        return (
            f"must be a dotted module path like 'model.layers.{{}}.mlp.down_proj', "
            f"got {template!r}"
        )
    return None


def _dotted(loc: tuple) -> str:
    """('gates', 'min_efficacy') -> 'gates.min_efficacy'; ('layers', 2) -> 'layers[2]'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _suggestion(loc: tuple) -> str | None:
    """The known field an unknown key at `loc` was probably meant to be, dotted, or None:
    a flat name's place (`steps` -> `values.steps`), else the closest name in its section."""
    key = str(loc[-1])
    if loc[:-1] == () and key in _NESTED_PATH:
        return ".".join(_NESTED_PATH[key])
    sections = {"gates": Gates, **SECTIONS}
    if len(loc) == 2 and loc[0] in sections:
        close = difflib.get_close_matches(key, list(sections[loc[0]].model_fields), n=1)
        return f"{loc[0]}.{close[0]}" if close else None
    if loc[:-1] == ():
        close = difflib.get_close_matches(key, list(Policy.model_fields), n=1)
        if close:
            return close[0]
        close = difflib.get_close_matches(key, list(_NESTED_PATH), n=1)
        return ".".join(_NESTED_PATH[close[0]]) if close else None
    return None


def _error_lines(exc: ValidationError) -> list[str]:
    """One 'field: problem' line per pydantic error (several for a multi-problem validator)."""
    lines = []
    for err in exc.errors(include_url=False):
        loc, kind, msg = tuple(err["loc"]), err["type"], err["msg"]
        if kind == "value_error" and "error" in err.get("ctx", {}):
            msg = str(err["ctx"]["error"])  # our own message, without pydantic's "Value error, "
        if kind == "extra_forbidden" and loc:
            msg = "unknown field (Extra inputs are not permitted)"
            guess = _suggestion(loc)
            if guess:
                msg += f"; did you mean {guess!r}?"
        elif kind not in ("missing", "value_error") and isinstance(
            err.get("input"), (int, float, str, bool, type(None))
        ):
            shown = repr(err["input"])
            msg += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
        where = _dotted(loc)
        lines.extend(f"{where}: {line}" if where else line for line in msg.splitlines())
    return lines


def _validate(data: Any, origin: str, files: bool = False) -> Policy:
    """Policy from plain data, or PolicyError with one 'ORIGIN: field: problem' line per problem.

    files: data read from a policy file, which is nested by concern (a flat name is an unknown
    field, with its place as the hint) and may not set `experiment`; elsewhere flat names
    (the store's form, the benchmarks' overrides) are read into their sections."""
    if not isinstance(data, Mapping):
        raise PolicyError(
            f"{origin}: a policy must be a mapping of field: value, got {type(data).__name__}"
        )
    if files and "experiment" in data:
        raise PolicyError(f"{origin}: experiment: benchmark-only settings are not read from a policy "
                          f"file", hint="pass them as overrides (push's policy_overrides, or a "
                          "benchmark's --push)")
    flat = [k for k in data if k in _NESTED_PATH] if files else []
    lines = [f"{k}: unknown field (Extra inputs are not permitted); did you mean "
             f"{'.'.join(_NESTED_PATH[k])!r}?" for k in flat]
    try:
        policy = Policy.model_validate({k: v for k, v in data.items() if k not in flat})
    except ValidationError as exc:
        lines += _error_lines(exc)
    if lines:
        raise PolicyError("\n".join(f"{origin}: {line}" for line in lines)) from None
    return policy


# -- reading files --------------------------------------------------------------------


class _StrictYamlLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_unique_mapping(
    loader: _StrictYamlLoader, node: yaml.MappingNode, deep: bool = False
) -> dict:
    loader.flatten_mapping(node)
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable key: construct_mapping reports it
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r}", key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictYamlLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictYamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        what = "; ".join(x for x in (exc.context, exc.problem) if x)
        raise PolicyError(f"{where}{line}: YAML error: {what}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"{where}: YAML error: {exc}") from None


def _parse_toml(text: str, where: str) -> Any:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise PolicyError(
                f"{where}: reading TOML needs Python 3.11+ or the 'tomli' package",
                hint="use a .yaml policy, or pip install tomli",
            ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message ends with "(at line N, column M)"
        raise PolicyError(f"{where}: TOML error: {exc}") from None


def load_policy(path: str | os.PathLike) -> Policy:
    """Read and validate a policy file (.yaml/.yml, or .toml).

    Raises PolicyError naming the file: missing or unreadable file, syntax error
    (with its line), or one 'FILE: field: problem' line per invalid field.
    """
    where = os.fspath(path)
    suffix = Path(where).suffix.lower()
    if suffix not in POLICY_SUFFIXES:
        raise PolicyError(
            f"{where}: unsupported policy file type {suffix or '(none)'!r}; "
            f"use one of {', '.join(POLICY_SUFFIXES)}"
        )
    try:
        text = Path(where).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(
            f"{where}: no such policy file",
            hint="give a path, or a name from `policies/` or $LIFELONG_POLICIES",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{where}: cannot read policy file: {exc}") from None
    data = _parse_toml(text, where) if suffix == ".toml" else _parse_yaml(text, where)
    if data is None:
        raise PolicyError(f"{where}: the policy file is empty")
    return _validate(data, where, files=True)


def policy_from_json(text: str) -> Policy:
    """The Policy a store kept as `Policy.model_dump_json()`; PolicyError if it is not valid."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, TypeError) as exc:
        raise PolicyError(f"stored policy: not valid JSON: {exc}") from None
    return _validate(data, "stored policy")


# -- finding files by name --------------------------------------------------------------


def _search_dirs() -> list[Path]:
    """$LIFELONG_POLICIES (os.pathsep-separated, in order), then the policies shipped in the package."""
    env = os.environ.get("LIFELONG_POLICIES", "")
    dirs = [Path(p).expanduser() for p in env.split(os.pathsep) if p.strip()]
    return dirs + [_SHIPPED_POLICIES]


def available_policies() -> dict[str, Path]:
    """Policy name -> file, over the search directories; an earlier directory wins a name."""
    found: dict[str, Path] = {}
    for folder in _search_dirs():
        if not folder.is_dir():
            continue
        for suffix in POLICY_SUFFIXES:
            for file in sorted(folder.glob(f"*{suffix}")):
                if file.is_file():
                    found.setdefault(file.stem, file)
    return found


def find_policy(name_or_path: str | os.PathLike) -> Path:
    """Resolve a policy argument: an existing file as is; else a name like 'smollm2-135m'.

    A name is looked up as <dir>/<name>.yaml|.yml|.toml in each directory of
    $LIFELONG_POLICIES (os.pathsep-separated), then among the shipped policies (`policies/`).
    Raises PolicyError listing the available names when nothing matches.
    """
    given = Path(name_or_path).expanduser()
    if given.is_file():
        return given
    if given.exists():
        raise PolicyError(f"{os.fspath(name_or_path)}: not a policy file (a directory?)")
    raw = os.fspath(name_or_path)
    looks_like_path = given.suffix.lower() in POLICY_SUFFIXES or any(
        sep and sep in raw for sep in (os.sep, os.altsep)
    )
    if not looks_like_path:
        for folder in _search_dirs():
            for suffix in POLICY_SUFFIXES:
                candidate = folder / f"{raw}{suffix}"
                if candidate.is_file():
                    return candidate
    names = sorted(available_policies())
    searched = ", ".join(os.fspath(d) for d in _search_dirs())
    raise PolicyError(
        f"{raw}: no such policy file or name; available: {', '.join(names) or '(none)'}",
        hint=f"looked in {searched}; set $LIFELONG_POLICIES to add directories",
    )
