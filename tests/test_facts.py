"""Fact files (DESIGN §3): formats accepted, every problem reported as FILE:LINE: field: problem."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifelong.errors import FactFileError
from lifelong.facts import Fact, FactFile, Neighbor, load_facts, parse_facts

DATA = Path("/work/shared/data/counterfact")
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DARRIEUX = {
    "subject": "Danielle Darrieux", "prompt": "The mother tongue of {} is", "target": "English",
    "relation": "P103", "target_true": "French",
    "paraphrases": ["Danielle Darrieux's native language is"],
    "neighbors": [{"prompt": "The mother tongue of Léon Blum is", "target": "French"}],
}

COUNTERFACT = {
    "case_id": 0, "pararel_idx": 2796,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is", "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"}, "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": ["Shayna does this.\nDanielle Darrieux, a native"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Montesquieu, a native"],
    "attribute_prompts": ["J.\u00a0R.\u00a0R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}


def fact(**overrides) -> dict:
    """A valid native record with some fields replaced (None removes the field)."""
    d = {"subject": "Paris", "prompt": "{} is the capital of", "target": "Italy"}
    d.update(overrides)
    return {k: v for k, v in d.items() if v is not None}


def jsonl(*records) -> bytes:
    """Records as JSONL bytes; a str record is written as the raw line."""
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records).encode() + b"\n"


def problems(data: bytes, name: str = "f.jsonl") -> list[str]:
    with pytest.raises(FactFileError) as info:
        parse_facts(data, name)
    assert info.value.path == name
    return info.value.problems


def only_problem(data: bytes, prefix: str, name: str = "f.jsonl") -> str:
    """The single problem of `data`, checked to start with `prefix`."""
    found = problems(data, name)
    assert len(found) == 1, found
    assert found[0].startswith(prefix), found
    return found[0]


# -- valid input ---------------------------------------------------------------

def test_native_file(tmp_path):
    path = tmp_path / "facts.jsonl"
    data = b"\n" + jsonl(DARRIEUX, fact(id=7)) + b"\n   \n"
    path.write_bytes(data)
    ff = load_facts(path)
    assert isinstance(ff, FactFile) and ff.path == str(path)
    assert len(ff.sha256) == 64
    a, b = ff.facts
    assert a == Fact("Danielle Darrieux", "The mother tongue of {} is", "English", "P103", "French",
                     ("Danielle Darrieux's native language is",),
                     (Neighbor("The mother tongue of Léon Blum is", "French"),), None, 2)
    assert a.render() == "The mother tongue of Danielle Darrieux is"
    assert a.key == ("Danielle Darrieux", "P103")
    assert (b.id, b.line) == ("7", 3)  # physical lines: the leading blank line counts


def test_relation_defaults_to_prompt_template():
    (f,) = parse_facts(jsonl(fact()), "x")
    assert f.relation == "{} is the capital of"
    assert f.key == ("Paris", "{} is the capital of")
    assert f.target_true is None and f.paraphrases == () and f.neighbors == () and f.id is None


def test_same_subject_other_relation_is_fine():
    facts = parse_facts(jsonl(fact(), fact(prompt="{} lies in", target="Spain")), "x")
    assert [f.line for f in facts] == [1, 2]


def test_render_leaves_other_braces_alone():
    f = Fact("x{0}", "In {lang}: {} = {0} {{x}}", "1", "r")
    assert f.render() == "In {lang}: x{0} = {0} {{x}}"
    assert f.render("Say {} twice") == "Say x{0} twice"


def test_counterfact_jsonl_line():
    (f,) = parse_facts(jsonl(COUNTERFACT), "cf.jsonl")
    assert f.subject == "Danielle Darrieux" and f.target == "English"
    assert f.relation == "P103" and f.target_true == "French" and f.id == "0"
    assert f.paraphrases == ("Shayna does this.\nDanielle Darrieux, a native",)
    assert f.neighbors == (Neighbor("The mother tongue of Léon Blum is", "French"),
                           Neighbor("Montesquieu, a native", "French"))


def test_counterfact_array_lines():
    second = json.loads(json.dumps(COUNTERFACT))
    second["case_id"] = 1
    second["requested_rewrite"]["subject"] = "Edwin"
    data = ("\ufeff[\n" + json.dumps(COUNTERFACT, indent=1) + ",\n\n  "
            + json.dumps(second, indent=1) + "\n]\n").encode()
    first_len = json.dumps(COUNTERFACT, indent=1).count("\n") + 1
    facts = parse_facts(data, "cf.json")
    assert [f.id for f in facts] == ["0", "1"]
    assert [f.line for f in facts] == [2, 2 + first_len + 1]


def test_empty_array_and_empty_file_have_no_facts():
    for data in (b"", b"\n \n", b" [ ] "):
        assert problems(data, "f.json") == ["f.json:0: file: no facts"]


@pytest.mark.skipif(not DATA.is_dir(), reason="shared data not present")
def test_shared_counterfact_files_load(tmp_path):
    ff = load_facts(DATA / "counterfact_rome_format_20.json")
    assert len(ff.facts) == 20 and ff.facts[0].line == 2
    assert all(f.neighbors and f.paraphrases and f.target_true for f in ff.facts)
    # The first 150 lines hold no duplicate (subject, relation); the full file does.
    head = b"".join((DATA / "counterfact_dev_3000.jsonl").read_bytes().splitlines(True)[:150])
    (tmp_path / "dev.jsonl").write_bytes(head)
    facts = load_facts(tmp_path / "dev.jsonl").facts
    assert len(facts) == 150 and facts[0].id == "cf0" and facts[0].relation == "P103"


# -- round trip --------------------------------------------------------------

def test_to_dict_round_trip():
    (f,) = parse_facts(jsonl(DARRIEUX), "x")
    d = f.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert Fact.from_dict(d) == f
    (g,) = parse_facts(jsonl(COUNTERFACT), "x")
    assert Fact.from_dict(g.to_dict()) == g


def test_from_dict_validates():
    with pytest.raises(FactFileError) as info:
        Fact.from_dict({"subject": "zz", "prompt": "no braces", "target": "b", "line": 4})
    assert info.value.problems == ["<dict>:4: prompt: has no {}; put {} where the subject goes"]


# -- problems ------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(FactFileError) as info:
        load_facts(tmp_path / "nope.jsonl")
    (p,) = info.value.problems
    assert p.startswith(f"{tmp_path / 'nope.jsonl'}:0: file: ")
    with pytest.raises(FactFileError):
        load_facts(tmp_path)  # a directory


def test_bad_json_and_not_object():
    assert only_problem(jsonl(fact(), "{nope"), "f.jsonl:2: line: bad JSON: ")
    assert only_problem(jsonl("[1, 2]", fact()), "f.jsonl:1: line: not a JSON object (got array)")
    assert only_problem(jsonl(fact(), "{} {}"), "f.jsonl:2: line: bad JSON: Extra data")


def test_invalid_utf8():
    data = jsonl(fact()) + b'{"subject": "Caf\xe9", "prompt": "{} is", "target": "x"}\n'
    assert only_problem(data, "f.jsonl:2: line: invalid UTF-8")
    assert only_problem(b'[{"a":\n "\xff"}]', "f.json:2: line: invalid UTF-8", "f.json")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_refused(literal):
    line = '{"subject": "a", "prompt": "{} b", "target": "c", "id": %s}' % literal
    assert only_problem(jsonl(line), f"f.jsonl:1: line: bad JSON: {literal} is not valid JSON")


def test_duplicate_json_key():
    line = '{"subject": "a", "subject": "b", "prompt": "{} b", "target": "c"}'
    assert only_problem(jsonl(line), 'f.jsonl:1: line: bad JSON: duplicate key "subject"')


def test_deep_nesting_never_crashes():
    nested = json.loads("[" * 21 + "]" * 21)  # 21 levels inside the record: 22 in all
    assert only_problem(jsonl(fact(id=nested)), "f.jsonl:1: line: nested deeper than 20 levels")
    assert only_problem(jsonl(fact(id=json.loads("[" * 18 + "]" * 18))),
                        "f.jsonl:1: id: must be a string or an integer")
    assert only_problem(jsonl("[" * 50_000 + "]" * 50_000), "f.jsonl:1: line: ")
    assert only_problem(b"[" * 90_000, "f.json:1: line: ", "f.json")  # array mode


def test_line_too_long():
    assert only_problem(jsonl(fact(), fact(target="x" * 100_001)),
                        "f.jsonl:2: line: line too long")


def test_huge_integer_is_reported():
    assert only_problem(jsonl('{"id": %s}' % ("9" * 5000)), "f.jsonl:1: line: bad JSON: ")


def test_missing_wrong_type_and_unknown_fields():
    found = problems(jsonl({"subject": 3, "prompt": "{} is", "traget": "x",
                            "paraphrases": "one", "neighbors": [5], "id": 1.5}))
    assert found == [
        "f.jsonl:1: traget: unknown field; did you mean 'target'?",
        "f.jsonl:1: subject: must be a string, got number",
        "f.jsonl:1: target: missing required field",
        "f.jsonl:1: paraphrases: must be an array, got string",
        "f.jsonl:1: neighbors[0]: must be an object with prompt and target, got number",
        "f.jsonl:1: id: must be a string or an integer, got number",
    ]


def test_null_counts_as_absent_only_for_optional_fields():
    assert parse_facts(jsonl(fact(relation=None, target_true=None)), "x")
    line = '{"subject": "a", "prompt": "{} b", "target": null, "target_true": null}'
    assert only_problem(jsonl(line), "f.jsonl:1: target: must be a string, got null")


def test_prompt_braces():
    assert only_problem(jsonl(fact(prompt="Paris is the capital of")),
                        'f.jsonl:1: prompt: has no {} but contains the subject "Paris" literally; '
                        "replace the subject with {}")
    assert only_problem(jsonl(fact(prompt="The capital of")), "f.jsonl:1: prompt: has no {}")
    assert only_problem(jsonl(fact(prompt="{} and {} are")),
                        "f.jsonl:1: prompt: contains {} 2 times")


@pytest.mark.parametrize("field", ["subject", "prompt", "target"])
@pytest.mark.parametrize("value", ["", "  \t "])
def test_blank_text(field, value):
    assert only_problem(jsonl(fact(**{field: value})), f"f.jsonl:1: {field}: is empty")


@pytest.mark.parametrize("field", ["subject", "prompt", "target"])
def test_control_characters(field):
    value = {"subject": "Par\x00is", "prompt": "{} is\nthe", "target": "It\u2028aly"}[field]
    assert only_problem(jsonl(fact(**{field: value})), f"f.jsonl:1: {field}: contains control")


@pytest.mark.parametrize("field", ["subject", "target"])
def test_too_long_text(field):
    value = "y" * 1001
    assert only_problem(jsonl(fact(**{field: value})),
                        f"f.jsonl:1: {field}: is 1001 characters long; the limit is 1000")


def test_paraphrases_and_neighbors():
    found = problems(jsonl(fact(
        paraphrases=["fine\nwith a newline", " ", "{} is"],
        neighbors=[{"prompt": "Rome is the capital of", "target": "Italy"},
                   {"target": "France"}, {"prompt": "", "target": " "},
                   {"prompt": "Bern is in", "target": "CH", "weight": 2}])))
    assert found == [
        "f.jsonl:1: paraphrases[1]: is empty",
        "f.jsonl:1: paraphrases[2]: contains {}; write the subject out (only `prompt` is a template)",
        "f.jsonl:1: neighbors[1].prompt: missing required field",
        "f.jsonl:1: neighbors[2].prompt: is empty",
        "f.jsonl:1: neighbors[2].target: is empty",
        "f.jsonl:1: neighbors[3].weight: unknown field",
    ]


def test_counterfact_field_names_are_dotted():
    rec = json.loads(json.dumps(COUNTERFACT))
    rec["requested_rewrite"]["subject"] = ""
    rec["requested_rewrite"]["target_new"] = {"id": "Q1"}
    rec["requested_rewrite"].pop("target_true")
    rec["extra"] = 1
    assert problems(jsonl(rec)) == [
        "f.jsonl:1: extra: unknown field",
        "f.jsonl:1: requested_rewrite.subject: is empty",
        "f.jsonl:1: requested_rewrite.target_new.str: missing required field",
        "f.jsonl:1: neighborhood_prompts: needs requested_rewrite.target_true, "
        "whose str is the neighbors' target",
    ]


def test_duplicate_subject_and_relation():
    data = jsonl(fact(), fact(prompt="{} lies in"), fact(target="Spain"))
    assert only_problem(data, "f.jsonl:3: line: same subject and relation as line 1; "
                              "a batch may hold one value per subject and relation")
    # Explicit relation: different templates, same relation, still one value.
    data = jsonl(fact(relation="capital"), fact(prompt="The country {} rules", relation="capital"))
    assert only_problem(data, "f.jsonl:2: line: same subject and relation as line 1")


def test_too_many_facts():
    line = b'{"subject": "s%d", "prompt": "{} is", "target": "t"}\n'
    data = b"".join(line % i for i in range(100_001))
    assert only_problem(data, "f.jsonl:100001: line: more than 100000 facts in one file")


def test_every_problem_of_the_file_is_listed():
    data = jsonl(fact(), "{bad", fact(subject=""), "7", fact(prompt="none"), fact())
    found = problems(data)
    assert [p.split(": ")[0] for p in found] == [
        "f.jsonl:2", "f.jsonl:3", "f.jsonl:4", "f.jsonl:5", "f.jsonl:6"]
    assert "f.jsonl:6: line: same subject and relation as line 1" in found[-1]


def test_array_errors():
    ok = '{"subject": "a", "prompt": "{}", "target": "b"}'
    for data, prefix in [
        (f"[\n{ok}\n{{}}]", "f.json:3: line: bad JSON: Expecting ',' or ']'"),
        (f"[\n 1,\n {ok}\n]", "f.json:2: line: not a JSON object (got number)"),
        (f"[{ok}] x", "f.json:1: line: bad JSON: Extra data after the array"),
        (f"[{ok},\n]", "f.json:2: line: bad JSON: Expecting value"),
    ]:
        assert only_problem(data.encode(), prefix, "f.json")


def test_jsonl_name_never_switches_to_array_mode():
    assert only_problem(jsonl("[1, 2]", fact()), "f.jsonl:1: line: not a JSON object (got array)")
    (f,) = parse_facts(b"[" + json.dumps(fact()).encode() + b"]", "<stdin>")
    assert f.subject == "Paris"


# -- properties ----------------------------------------------------------------

def check_outcome(data: bytes, name: str = "f.jsonl") -> list[Fact]:
    """parse_facts either returns facts or raises FactFileError with well-formed problems."""
    try:
        facts = parse_facts(data, name)
    except FactFileError as e:
        assert e.problems
        for p in e.problems:
            assert re.fullmatch(re.escape(name) + r":\d+: [^\n]+: [^\n]+", p), p
            p.encode("utf-8")  # printable: no unpaired surrogates leak into messages
        return []
    assert facts and all(isinstance(f, Fact) for f in facts)
    return facts


@FAST
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data):
    check_outcome(data)
    check_outcome(b"[" + data, "f.json")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20)


@FAST
@given(json_values)
def test_arbitrary_json_line(value):
    check_outcome(json.dumps(value).encode() + b"\n")
    check_outcome(json.dumps([value]).encode(), "f.json")


FIELDS = ["subject", "prompt", "target", "relation", "target_true", "paraphrases", "neighbors",
          "id", "requested_rewrite"]


@FAST
@given(st.sampled_from(FIELDS), json_values)
def test_arbitrary_field_values(field, value):
    check_outcome(jsonl(dict(DARRIEUX, **{field: value})))
    rec = json.loads(json.dumps(COUNTERFACT))
    rec["requested_rewrite"][field] = value
    check_outcome(jsonl(rec))


words = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")),
                min_size=1, max_size=12).filter(lambda s: s.strip() and "{}" not in s)


@st.composite
def valid_facts(draw) -> Fact:
    subject = draw(words)
    before, after = draw(words), draw(words)
    prompt = f"{before} {{}} {after}"
    relation = draw(st.none() | words)
    neighbors = draw(st.lists(st.builds(Neighbor, words, words), max_size=3))
    return Fact(subject, prompt, draw(words), relation or prompt, draw(st.none() | words),
                tuple(draw(st.lists(words, max_size=3))), tuple(neighbors),
                draw(st.none() | words), 1)


@FAST
@given(valid_facts())
def test_valid_facts_round_trip(f):
    assert Fact.from_dict(f.to_dict()) == f
    record = {k: v for k, v in f.to_dict().items() if k != "line"}
    (g,) = parse_facts(jsonl(record), "f.jsonl")
    assert g == f
