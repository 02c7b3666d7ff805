"""Policies: shipped files load, lookup by name, every bad input names its file and field."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from lifelong.errors import BadInput, PolicyError
from lifelong.policy import (
    SECTIONS,
    Gates,
    Policy,
    available_policies,
    find_policy,
    load_policy,
    policy_from_json,
)

REPO_POLICIES = Path(__file__).resolve().parent.parent / "lifelong" / "policies"   # policies/ links here
SHIPPED = sorted(REPO_POLICIES.glob("*.yaml"))
EXPECTED = {"smollm2-135m", "llama3-8b", "llama2-7b", "qwen2.5-7b", "gpt2-xl", "gpt-j-6b"}

MINIMAL_YAML = """\
name: tiny
model: a test model
source: written in a test
layers: [1, 2]
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path) -> str:
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    return str(info.value)


# -- shipped policies -------------------------------------------------------------------


def test_every_expected_policy_is_shipped():
    assert {p.stem for p in SHIPPED} >= EXPECTED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_policy_loads_and_describes_itself(path: Path):
    policy = load_policy(path)
    assert policy.name == path.stem
    assert policy.model and policy.source
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#"), "a policy file opens with a comment saying where numbers come from"
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert "MEAN" in header and "init" in header, "header must say thresholds are on the mean"


def test_shipped_values_match_the_published_ones():
    llama3 = load_policy(REPO_POLICIES / "llama3-8b.yaml")
    assert (llama3.layers, llama3.values.lr, llama3.values.steps) == ([4, 5, 6, 7, 8], 0.1, 25)
    assert (llama3.update.alpha, llama3.preserved.nullspace_threshold) == (10, 0.02)
    assert (llama3.alignment.lambda_kl, llama3.alignment.lambda_mse) == (2, 8)
    gpt2 = load_policy(REPO_POLICIES / "gpt2-xl.yaml")
    assert gpt2.module_name(13) == "transformer.h.13.mlp.c_proj"
    assert (gpt2.layers, gpt2.values.steps, gpt2.values.lr) == ([13, 14, 15, 16, 17], 20, 0.5)
    gptj = load_policy(REPO_POLICIES / "gpt-j-6b.yaml")
    assert gptj.module_template == "transformer.h.{}.mlp.fc_out"
    assert gptj.layers == [3, 4, 5, 6, 7, 8]
    qwen = load_policy(REPO_POLICIES / "qwen2.5-7b.yaml")
    assert (qwen.layers, qwen.alignment.lambda_kl, qwen.alignment.lambda_mse) == ([3, 4], 1.5, 8)
    smol = load_policy(REPO_POLICIES / "smollm2-135m.yaml")
    assert (smol.layers, smol.update.mom2_weight) == ([3, 4, 5, 6, 7], 20)
    assert (smol.update.project, smol.update.hold_earlier, smol.values.merged_steps) == (False, True, 80)   # tuned here (header)
    assert all(p.update.project and not p.update.hold_earlier for p in (llama3, gpt2, gptj, qwen))   # AlphaEdit as published
    assert smol.preserved.nullspace_threshold == 0.01
    assert (smol.preserved.corpus_tokens, smol.preserved.sampled_tokens) == (100_000, 20_000)              # a truer C₀ from a file
    assert (smol.values.optimizer, smol.values.metric, smol.preserved.fisher_tokens) == ("normalized", "fisher", 8192)
    assert all(p.values.metric == "euclidean" for p in (llama3, gpt2, gptj, qwen))
    assert all(load_policy(p).unused() == [] for p in SHIPPED)                       # nothing set that is ignored     # as published
    assert smol.n_contexts == 6 and smol.module_name(4) == "model.layers.4.mlp.down_proj"


# -- finding by name ----------------------------------------------------------------------


def test_find_policy_by_name_in_repo(monkeypatch):
    monkeypatch.delenv("LIFELONG_POLICIES", raising=False)
    path = find_policy("smollm2-135m")
    assert path == REPO_POLICIES / "smollm2-135m.yaml"
    assert load_policy(path).name == "smollm2-135m"


def test_find_policy_existing_path_is_returned_as_is(tmp_path):
    path = write(tmp_path, "mine.yaml", MINIMAL_YAML)
    assert find_policy(str(path)) == path


def test_env_dirs_come_first_and_toml_is_found(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    toml = 'name = "override"\nmodel = "m"\nsource = "s"\nlayers = [0]\n'
    write(first, "smollm2-135m.toml", toml)
    write(second, "only-here.yml", MINIMAL_YAML)
    monkeypatch.setenv("LIFELONG_POLICIES", f"{first}{os.pathsep}{second}")
    assert find_policy("smollm2-135m") == first / "smollm2-135m.toml"
    assert find_policy("only-here") == second / "only-here.yml"
    assert load_policy(find_policy("smollm2-135m")).name == "override"
    assert "only-here" in available_policies() and "gpt2-xl" in available_policies()


def test_unknown_name_lists_the_available_ones(monkeypatch):
    monkeypatch.delenv("LIFELONG_POLICIES", raising=False)
    with pytest.raises(PolicyError) as info:
        find_policy("smollm3-135m")
    message = str(info.value)
    assert "smollm3-135m" in message
    for name in EXPECTED:
        assert name in message
    assert isinstance(info.value, BadInput) and info.value.exit_code == 2


def test_missing_file_names_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert str(missing) in error_of(missing)
    with pytest.raises(PolicyError, match="nope.yaml"):
        find_policy(str(missing))


# -- bad files --------------------------------------------------------------------------


def test_unknown_key_names_file_and_field(tmp_path):
    path = write(tmp_path, "x.yaml", MINIMAL_YAML + "learning_rate: 0.1\n")
    message = error_of(path)
    assert message.startswith(f"{path}: learning_rate: ")
    assert "unknown field" in message


def test_unknown_gate_names_dotted_field_and_suggests(tmp_path):
    path = write(tmp_path, "x.yaml", MINIMAL_YAML + "gates:\n  min_eficacy: 0.8\n")
    message = error_of(path)
    assert f"{path}: gates.min_eficacy: unknown field" in message
    assert "gates.min_efficacy" in message


@pytest.mark.parametrize(
    "extra, field",
    [
        ("values: {lr: -0.1}\n", "values.lr"),
        ("gates:\n  min_efficacy: 1.5\n", "gates.min_efficacy"),
        ("alignment: {top_m: 0}\n", "alignment.top_m"),
        ("alignment: {tau: .nan}\n", "alignment.tau"),
        ("values: {steps: many}\n", "values.steps"),
        ("module_template: model.layers.{}.mlp.{}\n", "module_template"),
        ("module_template: model.layers.mlp\n", "module_template"),
        ("update: {project: false, mom2_weight: 0}\n", "update.mom2_weight"),
        ("values: {metric: fisher}\n", "values.metric"),
        ("experiment: {sweeps: 2}\n", "experiment"),
    ],
)
def test_bad_value_names_file_and_field(tmp_path, extra, field):
    path = write(tmp_path, "x.yaml", MINIMAL_YAML + extra)
    assert error_of(path).startswith(f"{path}: {field}: ")


def test_gate_message_reads_as_documented(tmp_path):
    path = write(tmp_path, "x.yaml", MINIMAL_YAML + "gates:\n  min_efficacy: 1.5\n")
    assert f"{path}: gates.min_efficacy: Input should be less than or equal to 1" in error_of(path)


@pytest.mark.parametrize("layers", ["[4, 3]", "[3, 3]", "[]", "[-1, 2]"])
def test_bad_layers_name_the_field(tmp_path, layers):
    text = MINIMAL_YAML.replace("layers: [1, 2]", f"layers: {layers}")
    message = error_of(write(tmp_path, "x.yaml", text))
    assert ": layers" in message


def test_every_problem_is_listed_one_per_line(tmp_path):
    text = MINIMAL_YAML.replace("layers: [1, 2]", "layers: [5, 4]")
    text += "values: {lr: 0}\ngates: {max_neighbor_drop: 2}\n"
    path = write(tmp_path, "x.yaml", text)
    lines = error_of(path).splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"{path}: ") for line in lines)
    fields = {line.split(": ")[1] for line in lines}
    assert fields == {"layers", "values.lr", "gates.max_neighbor_drop"}


def test_missing_required_field_is_named(tmp_path):
    path = write(tmp_path, "x.yaml", "name: tiny\nmodel: m\nlayers: [1]\n")
    assert f"{path}: source: Field required" in error_of(path)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "x.yaml", MINIMAL_YAML + "values: [0.1\n")
    message = error_of(path)
    assert message.startswith(f"{path}:") and "YAML" in message
    assert message.split(":")[1].isdigit(), message


def test_yaml_duplicate_key_is_refused(tmp_path):
    path = write(tmp_path, "x.yaml", MINIMAL_YAML + "values: {lr: 0.1}\nvalues: {lr: 0.2}\n")
    message = error_of(path)
    assert f"{path}:6:" in message and "duplicate key 'values'" in message


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_not_a_mapping(tmp_path, text):
    path = write(tmp_path, "x.yaml", text)
    assert error_of(path).startswith(f"{path}: ")


def test_unsupported_suffix(tmp_path):
    path = write(tmp_path, "x.json", "{}")
    assert "unsupported policy file type" in error_of(path)


def test_yaml_exponent_without_dot_is_read_as_a_number(tmp_path):
    # PyYAML reads `2e-2` as a string; the policy must still see 0.02.
    path = write(tmp_path, "x.yaml", MINIMAL_YAML + "preserved: {nullspace_threshold: 2e-2}\n")
    assert load_policy(path).preserved.nullspace_threshold == 0.02


# -- TOML ---------------------------------------------------------------------------------


def test_toml_policy_equals_yaml_policy(tmp_path):
    yaml_path = write(tmp_path, "p.yaml", MINIMAL_YAML + "values: {lr: 0.25}\ngates:\n  min_efficacy: 0.8\n")
    toml_path = write(
        tmp_path,
        "p.toml",
        'name = "tiny"\nmodel = "a test model"\nsource = "written in a test"\n'
        "layers = [1, 2]\n\n[values]\nlr = 0.25\n\n[gates]\nmin_efficacy = 0.8\n",
    )
    from_toml, from_yaml = load_policy(toml_path), load_policy(yaml_path)
    assert from_toml == from_yaml
    assert from_toml.digest() == from_yaml.digest()


def test_toml_errors_name_file_and_field(tmp_path):
    toml = 'name = "t"\nmodel = "m"\nsource = "s"\nlayers = [1]\n[values]\nlr = -1\n'
    bad_value = write(tmp_path, "v.toml", toml)
    assert error_of(bad_value).startswith(f"{bad_value}: values.lr: ")
    bad_syntax = write(tmp_path, "s.toml", 'name = "t\n')
    message = error_of(bad_syntax)
    assert message.startswith(f"{bad_syntax}: TOML error") and "line 1" in message


# -- copies, digest, JSON ---------------------------------------------------------------


@pytest.fixture
def smol() -> Policy:
    return load_policy(REPO_POLICIES / "smollm2-135m.yaml")


def test_with_overrides_returns_a_validated_copy(smol):
    ablated = smol.with_overrides(align=not smol.alignment.enabled, lr=0.1)             # flat names
    assert (ablated.alignment.enabled, ablated.values.lr) == (not smol.alignment.enabled, 0.1)
    assert (smol.alignment.enabled, smol.values.lr) == (False, 0.5), "the original is unchanged"
    nested = smol.with_overrides(values={"lr": 0.1}, alignment={"enabled": True})
    assert nested == ablated and nested.values.steps == smol.values.steps         # a section merges
    assert ablated.layers == smol.layers


def test_with_overrides_merges_partial_gates(smol):
    changed = smol.with_overrides(gates={"min_efficacy": 0.5})
    assert changed.gates.min_efficacy == 0.5
    assert changed.gates.max_neighbor_drop == smol.gates.max_neighbor_drop
    assert smol.with_overrides(gates=Gates(min_efficacy=0.7)).gates.min_efficacy == 0.7


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"lr": -1}, "values.lr"),
        ({"values": {"lr": -1}}, "values.lr"),
        ({"layers": [7, 3]}, "layers"),
        ({"gates": {"max_retention_drop": 1.5}}, "gates.max_retention_drop"),
        ({"no_such_field": 1}, "no_such_field"),
    ],
)
def test_with_overrides_validates(smol, fields, field):
    with pytest.raises(PolicyError) as info:
        smol.with_overrides(**fields)
    assert f": {field}: " in str(info.value)
    assert "smollm2-135m" in str(info.value)


def test_policy_is_frozen(smol):
    with pytest.raises(ValidationError):
        smol.values.lr = 1.0  # type: ignore[misc]
    with pytest.raises(ValidationError):
        smol.gates.min_efficacy = 0.0  # type: ignore[misc]


def test_digest_is_stable_and_sensitive(smol, tmp_path):
    again = load_policy(REPO_POLICIES / "smollm2-135m.yaml")
    assert smol.digest() == again.digest()
    assert len(smol.digest()) == 64 and int(smol.digest(), 16) >= 0
    canonical = json.dumps(smol.flat(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert smol.digest() == hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    assert smol.with_overrides(lr=0.4).digest() != smol.digest()
    assert smol.with_overrides(gates={"min_efficacy": 0.8}).digest() != smol.digest()
    # An int and the same float in the file give the same policy and digest.
    a = load_policy(write(tmp_path, "a.yaml", MINIMAL_YAML + "values: {lr: 1}\n"))
    b = load_policy(write(tmp_path, "b.yaml", MINIMAL_YAML + "values: {lr: 1.0}\n"))
    assert a.digest() == b.digest()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_json_round_trip(path):
    policy = load_policy(path)
    for text in (policy.stored_json(), policy.model_dump_json()):    # the store's flat form, or nested
        back = policy_from_json(text)
        assert back == policy
        assert back.digest() == policy.digest()


def test_stored_form_is_flat_in_the_order_stores_have_always_used(smol):
    stored = json.loads(smol.stored_json())
    assert list(stored)[:8] == ["name", "model", "source", "module_template", "layers", "n_prefixes",
                                "prefix_tokens", "steps"]
    assert list(stored)[-1] == "gates" and stored["align"] is False and stored["value_metric"] == "fisher"
    assert stored["sweeps"] == 1 and "experiment" not in stored


def test_flat_name_in_a_file_points_to_its_section(tmp_path):
    message = error_of(write(tmp_path, "x.yaml", MINIMAL_YAML + "steps: 10\n"))
    assert "steps: unknown field" in message and "did you mean 'values.steps'" in message


def test_settings_for_a_choice_not_made_are_listed(tmp_path):
    path = write(tmp_path, "x.yaml", MINIMAL_YAML + "values: {optimizer: normalized, lr: 0.3}\n"
                 "update: {project: true, mom2_weight: 100}\n")
    assert load_policy(path).unused() == [
        "values.lr: applies to values.optimizer adam only; ignored",
        "update.mom2_weight: applies to update.project false only; ignored"]
    assert load_policy(write(tmp_path, "y.yaml", MINIMAL_YAML + "values: {lr: 0.3}\n")).unused() == []


def test_policy_from_json_errors_are_policy_errors(smol):
    with pytest.raises(PolicyError, match="stored policy"):
        policy_from_json("{not json")
    data = json.loads(smol.stored_json())
    data["tau"] = 0
    with pytest.raises(PolicyError, match="stored policy: alignment.tau: "):
        policy_from_json(json.dumps(data))


def test_every_field_is_described():
    for model in (Policy, Gates, *SECTIONS.values()):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
