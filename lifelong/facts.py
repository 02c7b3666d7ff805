"""Fact files: read, validate and describe the facts a batch will edit (DESIGN §3).

A file is JSONL (one fact per line) or a whole-file JSON array (a file
starting with "[" whose name does not end in .jsonl). Each record is
either our native format (`subject`, `prompt`, `target`, ...) or a CounterFact
record as ROME/MEMIT ship it (`requested_rewrite`, ...). A file is all or
nothing: every problem is collected as `FILE:LINE: field: problem` and raised
together in one `FactFileError`, so a user fixes the whole file in one pass.

Pure Python on purpose: commands that only read facts must start fast.
"""
from __future__ import annotations

from collections.abc import Mapping

import difflib
import hashlib
import json
import os
import re
import unicodedata
from dataclasses import dataclass

from lifelong.errors import FactFileError

MAX_LINE_BYTES = 100_000  # longer JSONL lines are refused before parsing
MAX_DEPTH = 20            # JSON nesting; a fact needs 3, deeper is hostile or a mistake
MAX_TEXT = 1_000          # characters in a subject or target
MAX_FACTS = 100_000       # records per file; split bigger batches

NATIVE_FIELDS = ("subject", "prompt", "target", "relation", "target_true",
                 "paraphrases", "neighbors", "id")
COUNTERFACT_FIELDS = ("case_id", "pararel_idx", "requested_rewrite", "paraphrase_prompts",
                      "neighborhood_prompts", "attribute_prompts", "generation_prompts")
REWRITE_FIELDS = ("prompt", "subject", "target_new", "target_true", "relation_id")

# Unicode categories refused in text: control characters, unpaired surrogates
# (they cannot be written back as UTF-8), line and paragraph separators.
_BAD_CATEGORIES = {"Cc", "Cs", "Zl", "Zp"}
_BAD = object()  # a record that could not be read; counted, never turned into a Fact
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_A_KIND = {str: "a string", list: "an array", dict: "an object"}


def fact_key(fact: Mapping) -> tuple[str, str]:
    """(subject, relation) of a fact (a dict as stored, or a Fact's fields): a later fact with
    the same key supersedes it. The relation defaults to the prompt template (DESIGN §3)."""
    return (fact["subject"], fact.get("relation") or fact.get("prompt") or "")


@dataclass(frozen=True)
class Neighbor:
    """A prompt about another subject whose answer the edit must not change."""

    prompt: str  # full prompt, the neighbor subject written out (no {})
    target: str


@dataclass(frozen=True)
class Fact:
    """One requested edit: `render()` followed by `target` is what the model should say."""

    subject: str
    prompt: str  # template with "{}" exactly once, where the subject goes
    target: str
    relation: str  # `relation` if given, else the prompt template itself
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()  # full prompts (subject written out)
    neighbors: tuple[Neighbor, ...] = ()
    id: str | None = None
    line: int = 0  # 1-based line (or record start line) in the source file; 0 if none

    def render(self, template: str | None = None) -> str:
        """`template` (default the prompt) with {} replaced by the subject.

        str.replace, not str.format: prompts may hold other braces.
        """
        return (self.prompt if template is None else template).replace("{}", self.subject)

    @property
    def key(self) -> tuple[str, str]:
        """(subject, relation): a later fact with the same key supersedes this one (`fact_key`)."""
        return fact_key(vars(self))

    def to_dict(self) -> dict:
        """A JSON-safe dict in the native format (plus `line`); `from_dict` reads it back."""
        d = {"subject": self.subject, "prompt": self.prompt, "target": self.target,
             "relation": self.relation}
        if self.target_true is not None:
            d["target_true"] = self.target_true
        d["paraphrases"] = list(self.paraphrases)
        d["neighbors"] = [{"prompt": n.prompt, "target": n.target} for n in self.neighbors]
        if self.id is not None:
            d["id"] = self.id
        d["line"] = self.line
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Fact:
        """Rebuild a fact from `to_dict` output (or a native record), validating it.

        Raises FactFileError (file name "<dict>") if the dict is not a valid fact.
        """
        if not isinstance(d, dict):
            raise FactFileError("<dict>", [f"<dict>:0: line: not a JSON object (got {_kind(d)})"])
        d = dict(d)
        line = d.pop("line", 0)
        if isinstance(line, bool) or not isinstance(line, int) or line < 0:
            raise FactFileError("<dict>", ["<dict>:0: line: must be a non-negative integer"])
        problems: list[str] = []
        fact = _to_fact(d, _Checker("<dict>", line, problems))
        if fact is None:
            raise FactFileError("<dict>", problems)
        return fact


@dataclass(frozen=True)
class FactFile:
    """A validated fact file; `sha256` (of the raw bytes) identifies what was pushed."""

    path: str
    sha256: str
    facts: list[Fact]


def load_facts(path: str | os.PathLike) -> FactFile:
    """Read and validate a fact file; raises FactFileError listing every problem."""
    name = os.fsdecode(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (OSError, ValueError) as e:  # ValueError: a path with a NUL byte
        reason = getattr(e, "strerror", None) or str(e)
        raise FactFileError(name, [f"{name}:0: file: {reason}"]) from None
    return FactFile(name, hashlib.sha256(data).hexdigest(), parse_facts(data, name))


def parse_facts(data: bytes, name: str) -> list[Fact]:
    """Validate the bytes of a fact file named `name` (used in messages only).

    Returns the facts in file order, or raises one FactFileError with every problem.
    """
    problems: list[str] = []
    facts: list[Fact] = []
    first_line: dict[tuple[str, str], int] = {}
    count = 0
    for line, value in _records(data, name, problems):
        count += 1
        if count > MAX_FACTS:
            problems.append(f"{name}:{line}: line: more than {MAX_FACTS} facts in one file; "
                            "split it into several batches")
            break
        if value is _BAD:
            continue
        fact = _to_fact(value, _Checker(name, line, problems))
        if fact is None:
            continue
        if fact.key in first_line:
            problems.append(f"{name}:{line}: line: same subject and relation as line "
                            f"{first_line[fact.key]}; a batch may hold one value per subject "
                            "and relation")
        else:
            first_line[fact.key] = line
        facts.append(fact)
    if count == 0 and not problems:
        problems.append(f"{name}:0: file: no facts")
    if problems:
        raise FactFileError(name, problems)
    return facts


# -- reading records ---------------------------------------------------------

def _reject_constant(literal: str):
    """json accepts NaN and Infinity by default; they are not JSON and no fact needs them."""
    raise _JSONValueError(f"{literal} is not valid JSON")


def _unique_keys(pairs: list) -> dict:
    """json keeps the last of two equal keys silently; a typo'd file should not."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _JSONValueError(f"duplicate key {_quote(dup)}")
    return d


class _JSONValueError(ValueError):
    """A JSON problem found by our decoder hooks (they carry no position)."""


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_unique_keys)


def json_records(data: bytes, name: str, problems: list[str]) -> list[tuple[int, object]]:
    """(line, value) of each readable record of a JSON-array or JSONL file, read by the rules
    of fact files (BOM, duplicate keys, depth, line numbers); what cannot be read is reported
    in problems and left out. For other record formats (`lifelong locate`'s known facts)."""
    return [(line, v) for line, v in _records(data, name, problems) if v is not _BAD]


def _records(data: bytes, name: str, problems: list[str]):
    """Yield (line, value) per record, or (line, _BAD) after reporting why it is unreadable.

    A file starting with "[" is one JSON array unless its name ends in .jsonl,
    where a first line holding an array is a bad record, not a format switch.
    """
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark, as some editors write
        data = data[3:]
    if re.match(rb"[ \t\r\n]*\[", data) and not name.lower().endswith(".jsonl"):
        yield from _array_records(data, name, problems)
    else:
        yield from _jsonl_records(data, name, problems)


def _jsonl_records(data: bytes, name: str, problems: list[str]):
    """One record per non-blank physical line; a bad line is reported and reading goes on."""
    for line, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        where = f"{name}:{line}: line: "
        if len(raw) > MAX_LINE_BYTES:
            problems.append(where + f"line too long ({len(raw)} bytes; the limit is {MAX_LINE_BYTES})")
            yield line, _BAD
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(where + f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1}); "
                            "save the file as UTF-8")
            yield line, _BAD
            continue
        try:
            value = _DECODER.decode(text)
        except (ValueError, RecursionError) as e:
            problems.append(where + _json_problem(e))
            yield line, _BAD
            continue
        yield line, _shallow(value, where, problems)


def _array_records(data: bytes, name: str, problems: list[str]):
    """Elements of a whole-file JSON array, each at the line where it starts.

    A JSON error ends the walk: after one, element boundaries are unknown.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        problems.append(f"{name}:{line}: line: invalid UTF-8 (byte 0x{data[e.start]:02x}); "
                        "save the file as UTF-8")
        return
    pos = _JSON_SPACE.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    try:
        if text.startswith("]", pos):
            pos += 1
        else:
            while True:
                line += text.count("\n", counted, pos)
                counted = pos
                value, pos = _DECODER.raw_decode(text, pos)
                yield line, _shallow(value, f"{name}:{line}: line: ", problems)
                pos = _JSON_SPACE.match(text, pos).end()
                if text.startswith("]", pos):
                    pos += 1
                    break
                if not text.startswith(",", pos):
                    raise json.JSONDecodeError("Expecting ',' or ']' after an element", text, pos)
                pos = _JSON_SPACE.match(text, pos + 1).end()
        pos = _JSON_SPACE.match(text, pos).end()
        if pos < len(text):
            raise json.JSONDecodeError("Extra data after the array", text, pos)
    except (ValueError, RecursionError) as e:
        if isinstance(e, json.JSONDecodeError):
            line = e.lineno
        problems.append(f"{name}:{line}: line: " + _json_problem(e))
        yield line, _BAD


def _json_problem(e: Exception) -> str:
    """One line saying why JSON text could not be decoded."""
    if isinstance(e, RecursionError):
        return f"nested deeper than {MAX_DEPTH} levels"
    if isinstance(e, json.JSONDecodeError):
        return f"bad JSON: {e.msg} (column {e.colno})"
    if isinstance(e, _JSONValueError):
        return f"bad JSON: {e}"
    return "bad JSON: a number is too long"  # int digit limit (CPython >= 3.11)


def _shallow(value, where: str, problems: list[str]):
    """`value`, or _BAD (reported) if nested deeper than MAX_DEPTH; walks without recursion."""
    depth, level = 0, [value]
    while level:
        level = [v for v in level if isinstance(v, (dict, list))]
        if level:
            depth += 1
        if depth > MAX_DEPTH:
            problems.append(where + f"nested deeper than {MAX_DEPTH} levels")
            return _BAD
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v)]
    return value


# -- checking fields ---------------------------------------------------------

def _kind(value) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _quote(s: str, limit: int = 60) -> str:
    """`s` in double quotes, escaped to one printable line, shortened to about `limit` chars."""
    q = json.dumps(s)
    return q if len(q) <= limit else q[: limit - 4] + '..."'


def _field(prefix: str, key: str) -> str:
    """A dotted field name; odd keys are quoted so the message stays one line."""
    return prefix + (key if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,40}", key) else _quote(key))


class _Checker:
    """Reads the fields of one record, noting each problem instead of stopping at the first."""

    def __init__(self, name: str, line: int, problems: list[str]):
        self.name, self.line, self.problems = name, line, problems
        self.start = len(problems)

    @property
    def ok(self) -> bool:
        return len(self.problems) == self.start

    def report(self, field: str, problem: str) -> None:
        self.problems.append(f"{self.name}:{self.line}: {field}: {problem}")

    def known(self, obj: dict, prefix: str, allowed: tuple[str, ...]) -> None:
        """Report keys outside `allowed`, suggesting the closest known one."""
        for key in obj:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                self.report(_field(prefix, key), "unknown field" + hint)

    def get(self, obj: dict, prefix: str, key: str, kind: type, required: bool = False):
        """obj[key] if it has type `kind`, else None; missing counts only if `required`.

        An optional field set to null counts as absent.
        """
        value = obj.get(key)
        if value is None and (not required or key not in obj):
            if required:
                self.report(prefix + key, "missing required field")
            return None
        if not isinstance(value, kind) or isinstance(value, bool):
            self.report(prefix + key, f"must be {_A_KIND[kind]}, got {_kind(value)}")
            return None
        return value

    def clean(self, field: str, value: str, max_len: int | None = None, allow: str = "") -> bool:
        """True if `value` is usable text: not blank, no control characters, not too long."""
        bad = next((c for c in value
                    if c not in allow and unicodedata.category(c) in _BAD_CATEGORIES), None)
        if not value.strip():
            self.report(field, "is empty")
        elif bad is not None:
            self.report(field, f"contains control character U+{ord(bad):04X}")
        elif max_len is not None and len(value) > max_len:
            self.report(field, f"is {len(value)} characters long; the limit is {max_len}")
        else:
            return True
        return False

    def text(self, obj: dict, prefix: str, key: str, required: bool = False,
             max_len: int | None = None) -> str | None:
        """A clean string field, or None (reported unless optional and absent)."""
        value = self.get(obj, prefix, key, str, required)
        return value if value is not None and self.clean(prefix + key, value, max_len) else None

    def ident(self, obj: dict, prefix: str, key: str) -> str | None:
        """An id given as a string or an integer, kept as a string."""
        value = obj.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if value is not None and not isinstance(value, str):
            self.report(prefix + key, f"must be a string or an integer, got {_kind(value)}")
            return None
        return self.text(obj, prefix, key)

    def full_prompt(self, field: str, value) -> str | None:
        """A prompt with its subject written out: paraphrases and neighbors.

        Newlines and tabs are allowed (CounterFact paraphrases start with a
        context passage); a {} is refused because nothing would fill it.
        """
        if not isinstance(value, str):
            self.report(field, f"must be a string, got {_kind(value)}")
        elif self.clean(field, value, allow="\t\n\r"):
            if "{}" not in value:
                return value
            self.report(field, "contains {}; write the subject out (only `prompt` is a template)")
        return None

    def prompts(self, obj: dict, prefix: str, key: str) -> tuple[str, ...]:
        """A list of full prompts."""
        items = self.get(obj, prefix, key, list) or []
        found = [self.full_prompt(f"{prefix}{key}[{i}]", p) for i, p in enumerate(items)]
        return tuple(p for p in found if p is not None)

    def neighbors(self, obj: dict, prefix: str, key: str) -> tuple[Neighbor, ...]:
        """A list of {"prompt", "target"} objects."""
        out = []
        for i, item in enumerate(self.get(obj, prefix, key, list) or []):
            field = f"{prefix}{key}[{i}]"
            if not isinstance(item, dict):
                self.report(field, f"must be an object with prompt and target, got {_kind(item)}")
                continue
            self.known(item, field + ".", ("prompt", "target"))
            if "prompt" not in item:
                self.report(field + ".prompt", "missing required field")
            prompt = self.full_prompt(field + ".prompt", item["prompt"]) if "prompt" in item else None
            target = self.text(item, field + ".", "target", required=True, max_len=MAX_TEXT)
            if prompt is not None and target is not None:
                out.append(Neighbor(prompt, target))
        return tuple(out)

    def template(self, field: str, prompt: str | None, subject: str | None) -> None:
        """The prompt must hold exactly one {}, where the subject goes."""
        if prompt is None or prompt.count("{}") == 1:
            return
        n = prompt.count("{}")
        if n > 1:
            self.report(field, f"contains {{}} {n} times; it must appear exactly once, "
                        "where the subject goes")
        elif subject is not None and subject in prompt:
            self.report(field, f"has no {{}} but contains the subject {_quote(subject)} literally; "
                        "replace the subject with {}")
        else:
            self.report(field, "has no {}; put {} where the subject goes")


def _to_fact(value, c: _Checker) -> Fact | None:
    """The Fact a decoded record describes, or None after reporting its problems."""
    if not isinstance(value, dict):
        c.report("line", f"not a JSON object (got {_kind(value)}); each record must be an object")
        return None
    fact = _counterfact(value, c) if "requested_rewrite" in value else _native(value, c)
    return fact if c.ok else None


def _native(d: dict, c: _Checker) -> Fact | None:
    """Our own format (DESIGN §3)."""
    c.known(d, "", NATIVE_FIELDS)
    subject = c.text(d, "", "subject", required=True, max_len=MAX_TEXT)
    prompt = c.text(d, "", "prompt", required=True)
    target = c.text(d, "", "target", required=True, max_len=MAX_TEXT)
    relation = c.text(d, "", "relation")
    target_true = c.text(d, "", "target_true", max_len=MAX_TEXT)
    paraphrases = c.prompts(d, "", "paraphrases")
    neighbors = c.neighbors(d, "", "neighbors")
    ident = c.ident(d, "", "id")
    c.template("prompt", prompt, subject)
    if not c.ok:
        return None
    return Fact(subject, prompt, target, relation or prompt, target_true, paraphrases,
                neighbors, ident, c.line)


def _counterfact(d: dict, c: _Checker) -> Fact | None:
    """A CounterFact record as ROME/MEMIT ship it; attribute and generation prompts are ignored."""
    c.known(d, "", COUNTERFACT_FIELDS)
    rw = c.get(d, "", "requested_rewrite", dict, required=True) or {}
    p = "requested_rewrite."
    c.known(rw, p, REWRITE_FIELDS)
    subject = c.text(rw, p, "subject", required=True, max_len=MAX_TEXT)
    prompt = c.text(rw, p, "prompt", required=True)
    relation = c.text(rw, p, "relation_id")
    new = c.get(rw, p, "target_new", dict, required=True) or {}
    c.known(new, p + "target_new.", ("str", "id"))
    target = c.text(new, p + "target_new.", "str", required=True, max_len=MAX_TEXT)
    true = c.get(rw, p, "target_true", dict)
    target_true = None
    if true is not None:
        c.known(true, p + "target_true.", ("str", "id"))
        target_true = c.text(true, p + "target_true.", "str", required=True, max_len=MAX_TEXT)
    paraphrases = c.prompts(d, "", "paraphrase_prompts")
    neighbor_prompts = c.prompts(d, "", "neighborhood_prompts")
    if neighbor_prompts and rw.get("target_true") is None:
        c.report("neighborhood_prompts", "needs requested_rewrite.target_true, "
                 "whose str is the neighbors' target")
    ident = c.ident(d, "", "case_id")
    c.template(p + "prompt", prompt, subject)
    if not c.ok:
        return None
    neighbors = tuple(Neighbor(q, target_true) for q in neighbor_prompts)
    return Fact(subject, prompt, target, relation or prompt, target_true, paraphrases,
                neighbors, ident, c.line)
