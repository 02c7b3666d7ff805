"""The operator contract of the `lifelong` command line (DESIGN §2, §3, §5) on a tiny Llama.

Most tests call the click entry point in-process (CliRunner: no interpreter start, no model
re-import); the few that need a real process (the installed script, SIGKILL) run
`lifelong` as a subprocess with one OpenMP thread. One store is `init`ed per module and
copied for each test that writes to it.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import write_policy
from lifelong.store.store import Store
from helpers import cli, copy_store, sha, write_jsonl

FACTS_1 = [
    {"subject": "France", "prompt": "The capital of {} is", "target": "Rome",
     "neighbors": [{"prompt": "The capital of Italy is", "target": "Rome"}]},
    {"subject": "Brazil", "prompt": "The official language of {} is", "target": "Dutch"},
]
FACTS_2 = [
    {"subject": "Apple", "prompt": "{} makes the", "target": "piano"},
    {"subject": "Berlin", "prompt": "{} is in", "target": "Brazil"},
]
EDITED = {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}

LIFELONG = Path(sys.executable).with_name("lifelong")


# ----------------------------------------------------------------------------- helpers








def store_digest(store: Path) -> dict[str, str]:
    """sha256 of the manifest and of every file under STORE.d, by relative name."""
    files = {store.name: store}
    objdir = store.with_name(store.name + ".d")
    files.update({str(p.relative_to(store.parent)): p for p in sorted(objdir.rglob("*")) if p.is_file()})
    return {name: sha(p) for name, p in files.items()}



def log_json(store: Path) -> list[dict]:
    return json.loads(cli("log", "--json", "--store", store).stdout)


def process_env(**extra) -> dict:
    """Environment for a real `lifelong` process: one thread, offline, no inherited store."""
    env = {k: v for k, v in os.environ.items() if k not in ("LIFELONG_STORE", "LIFELONG_DEBUG")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def lifelong_cmd() -> list[str]:
    return [str(LIFELONG)] if LIFELONG.exists() else [sys.executable, "-m", "lifelong.cli"]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory) -> Path:
    return write_policy(tmp_path_factory.mktemp("policy"), "llama")


@pytest.fixture(scope="module")
def initialized(tmp_path_factory, tiny_llama_dir, policy_file):
    """(store, Result) of one `lifelong init` through the CLI; tests must not write to it."""
    store = tmp_path_factory.mktemp("pristine") / "s.h5"
    res = cli("init", "--model", tiny_llama_dir, "--policy", policy_file, "--store", store)
    return store, res


@pytest.fixture(scope="module")
def pristine(initialized) -> Path:
    return initialized[0]


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, pristine) -> Path:
    """A store holding batch 1 (FACTS_1), pushed through the CLI; tests must not write to it."""
    d = tmp_path_factory.mktemp("pushed")
    store = copy_store(pristine, d)
    cli("push", write_jsonl(d / "facts1.jsonl", FACTS_1), "--store", store)
    return store


@pytest.fixture
def fresh(pristine, tmp_path) -> Path:
    """A private copy of the freshly initialized store."""
    return copy_store(pristine, tmp_path / "store")


@pytest.fixture
def one_batch(pushed, tmp_path) -> Path:
    """A private copy of the store holding batch 1."""
    return copy_store(pushed, tmp_path / "store")


# ----------------------------------------------------------------------------- 1. init


def test_init_creates_a_store(initialized):
    store, res = initialized
    assert f"created {store}" in res.stdout
    st = Store.open(store)
    assert st.records == []
    assert set(st.base_fingerprint) == {"0", "1"}
    assert set(st.info["layers"]) == {"0", "1"}


def test_second_init_on_same_path_exits_1_names_the_store_and_leaves_it_byte_identical(
        pristine, tiny_llama_dir, policy_file):
    before = store_digest(pristine)
    res = cli("init", "--model", tiny_llama_dir, "--policy", policy_file, "--store", pristine, code=1)
    assert str(pristine) in res.stderr
    assert res.stdout == ""
    assert store_digest(pristine) == before


def test_init_heldout_option_names_its_file_and_a_bad_one_names_line_and_field(
        tmp_path, tiny_llama_dir, policy_file):
    text = tmp_path / "held.txt"
    text.write_text("".join(f"The river ran past hill {i} in the quiet town.\n" for i in range(300)))
    store = tmp_path / "s.h5"
    cli("init", "--model", tiny_llama_dir, "--policy", policy_file, "--heldout", text, "--store", store)
    info = Store.open(store).info
    assert info["heldout_source"] == f"file {text}" and len(info["heldout"]) > 1
    bad = tmp_path / "held.jsonl"
    bad.write_text('{"text": "fine"}\n[1, 2]\n')
    res = cli("init", "--model", tiny_llama_dir, "--policy", policy_file, "--heldout", bad,
              "--store", tmp_path / "t.h5", code=2)
    assert f"{bad}:2: text:" in res.stderr
    assert not (tmp_path / "t.h5").exists()


# ----------------------------------------------------------------------------- 2. malformed pushes

GOOD = {"subject": "Italy", "prompt": "The capital of {} is", "target": "Paris"}


def _line(**kw) -> str:
    return json.dumps({"subject": "X", "prompt": "{} is", "target": "Y", **kw})


BAD_LINES = {  # name -> (line, field the problem is reported on)
    "bad_json": ('{"subject": "X", "prompt": "{} is", "target": ', "line"),
    "invalid_utf8": (b'{"subject": "Caf\xe9", "prompt": "{} is", "target": "Y"}', "line"),
    "huge_line": (_line(target="y" * 100_001), "line"),
    "nan": ('{"subject": "X", "prompt": "{} is", "target": "Y", "id": NaN}', "line"),
    "infinity": ('{"subject": "X", "prompt": "{} is", "target": "Y", "id": -Infinity}', "line"),
    "deep_nesting": (_line(id=json.loads("[" * 30 + "]" * 30)), "line"),
    "missing_field": (json.dumps({"prompt": "{} is", "target": "Y"}), "subject"),
    "prompt_without_slot": (_line(prompt="no slot here"), "prompt"),
    "prompt_with_two_slots": (_line(prompt="{} and {} are"), "prompt"),
    "subject_written_out": (_line(prompt="X is"), "prompt"),
    "empty_target": (_line(target=""), "target"),
    "whitespace_target": (_line(target=" \t "), "target"),
    "duplicate_fact": (json.dumps(dict(GOOD, target="Rome")), "line"),   # line 1's subject and relation
    "unknown_field": (_line(colour="blue"), "colour"),
}
PROBLEM = re.compile(r"^(?P<file>.+):(?P<line>\d+): (?P<field>[^:]+): (?P<problem>\S.*)$")


def _malformed(tmp_path: Path, case: str) -> tuple[Path, list[tuple[int, str]]]:
    """A fact file for `case` and the (line, field) of every problem it holds."""
    if case == "all":
        lines, expected = [json.dumps(GOOD)], []
        for text, fld in BAD_LINES.values():
            lines.append(text)
            expected.append((len(lines), fld))
    else:
        text, fld = BAD_LINES[case]
        lines, expected = [json.dumps(GOOD), text], [(2, fld)]
    path = tmp_path / f"{case}.jsonl"
    path.write_bytes(b"".join((t if isinstance(t, bytes) else t.encode()) + b"\n" for t in lines))
    return path, expected


@pytest.mark.parametrize("case", ["all", *BAD_LINES])
def test_malformed_push_exits_2_lists_every_problem_and_leaves_store_byte_identical(one_batch, tmp_path, case):
    bad, expected = _malformed(tmp_path, case)
    before = store_digest(one_batch)
    listing = sorted(p.name for p in one_batch.parent.iterdir())
    res = cli("push", bad, "--store", one_batch, code=2)
    found = [(int(m["line"]), m["field"]) for m in map(PROBLEM.match, res.stderr.splitlines())
             if m and m["file"] == str(bad)]
    assert found == expected, res.stderr
    assert res.stdout == ""
    assert store_digest(one_batch) == before
    assert sorted(p.name for p in one_batch.parent.iterdir()) == listing


def test_push_of_missing_file_exits_2_and_names_it(one_batch, tmp_path):
    before = store_digest(one_batch)
    missing = tmp_path / "nope.jsonl"
    res = cli("push", missing, "--store", one_batch, code=2)
    assert f"{missing}:0: file:" in res.stderr
    assert store_digest(one_batch) == before


# ----------------------------------------------------------------------------- 3. push, log, show, status


def test_push_prints_a_row_per_fact_and_a_summary(fresh, tmp_path):
    res = cli("push", write_jsonl(tmp_path / "b.jsonl", FACTS_1), "--store", fresh)
    lines = res.stdout.splitlines()
    assert re.match(r"^\s*#\s+ok\s+subject\s+target\s+prompt", lines[0]), res.stdout
    for i, f in enumerate(FACTS_1, 1):
        row = next(l for l in lines if re.match(rf"^\s*{i}\s", l))
        assert f["subject"] in row and f["target"] in row and f["prompt"] in row
    assert re.search(r"^batch 1: efficacy \d", res.stdout, re.M), res.stdout
    assert [r["id"] for r in log_json(fresh)] == [1]


def test_push_json_has_batch_summary_and_facts(one_batch, tmp_path):
    res = cli("push", write_jsonl(tmp_path / "b2.jsonl", FACTS_2), "--store", one_batch, "--json")
    d = json.loads(res.stdout)
    assert {"batch", "summary", "facts"} <= set(d)
    assert d["batch"] == 2 and d["dry_run"] is False
    assert [f["subject"] for f in d["facts"]] == [f["subject"] for f in FACTS_2]
    assert d["summary"]["n_facts"] == 2


def test_log_lists_the_batch_in_text_and_json(pushed):
    text = cli("log", "--store", pushed).stdout
    assert re.search(r"^\s*1\s.*active.*2 facts.*facts1\.jsonl", text, re.M), text
    rows = log_json(pushed)
    assert len(rows) == 1
    row = rows[0]
    assert row["id"] == 1 and row["status"] == "active" and row["n_facts"] == 2
    assert row["sha256"] == sha(pushed.parent / "facts1.jsonl")
    assert row["source"].endswith("facts1.jsonl")


def test_show_reports_batch_1_in_text_and_json(pushed):
    text = cli("show", "1", "--store", pushed).stdout
    assert text.startswith("batch 1  active"), text
    assert "The capital of France is -> Rome" in text
    d = json.loads(cli("show", "1", "--store", pushed, "--json").stdout)
    assert d["id"] == 1 and d["status"] == "active"
    assert [f["subject"] for f in d["facts"]] == ["France", "Brazil"]
    assert d["sha256"] == sha(pushed.parent / "facts1.jsonl")


def test_status_reports_head_1_in_text_and_json(pushed):
    text = cli("status", "--store", pushed).stdout
    assert re.search(r"^head\s+1;", text, re.M), text
    d = json.loads(cli("status", "--store", pushed, "--json").stdout)
    assert d["head"] == 1 and d["batches"] == 1 and d["live_facts"] == 2
    assert d["store"] == str(pushed)


def test_show_of_unknown_batch_exits_2(pushed):
    before = store_digest(pushed)
    res = cli("show", "99", "--store", pushed, code=2)
    assert "99" in res.stderr
    assert store_digest(pushed) == before


# ----------------------------------------------------------------------------- 4. rollback


def test_rollback_to_0_marks_the_batch_reverted(one_batch):
    res = cli("rollback", "--to", "0", "--store", one_batch)
    assert "head 1 -> 0" in res.stdout
    assert re.search(r"^\s*1\s.*reverted", cli("log", "--store", one_batch).stdout, re.M)
    assert [r["status"] for r in log_json(one_batch)] == ["reverted"]
    assert json.loads(cli("status", "--json", "--store", one_batch).stdout)["head"] == 0


@pytest.mark.parametrize("to", ["5", "-1"])
def test_rollback_to_unknown_batch_exits_2_and_changes_nothing(one_batch, to):
    before = store_digest(one_batch)
    res = cli("rollback", "--to", to, "--store", one_batch, code=2)
    assert f"cannot roll back to {to}" in res.stderr
    assert store_digest(one_batch) == before
    assert [r["status"] for r in log_json(one_batch)] == ["active"]


# ----------------------------------------------------------------------------- 5. export


def test_export_writes_a_checkpoint_transformers_loads_with_edited_weights(pushed, tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    before = store_digest(pushed)
    out = tmp_path / "exported"
    res = cli("export", "--out", out, "--store", pushed)
    assert f"exported head 1 to {out}" in res.stdout
    assert store_digest(pushed) == before
    meta = json.loads((out / "lifelong_export.json").read_text())
    assert meta["head"] == 1

    edited = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    assert set(edited) == set(base)
    changed = {k for k in base if not (edited[k].shape == base[k].shape and bool((edited[k] == base[k]).all()))}
    assert changed == EDITED


def test_export_into_non_empty_dir_exits_2_and_leaves_it_alone(pushed, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = cli("export", "--out", out, "--store", pushed, code=2)
    assert str(out) in res.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- 6. --store default


def test_store_defaults_to_LIFELONG_STORE(one_batch, tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    env = {"LIFELONG_STORE": str(one_batch)}
    assert [r["id"] for r in json.loads(cli("log", "--json", env=env).stdout)] == [1]
    assert json.loads(cli("status", "--json", env=env).stdout)["store"] == str(one_batch)
    assert cli("show", "1", env=env).stdout.startswith("batch 1")
    d = json.loads(cli("push", write_jsonl(tmp_path / "b2.jsonl", FACTS_2), "--json", env=env).stdout)
    assert d["batch"] == 2
    assert [r["id"] for r in log_json(one_batch)] == [1, 2]
    assert list(work.iterdir()) == []                      # no stores/default.h5 was made


def test_store_option_overrides_LIFELONG_STORE(pushed, tmp_path):
    env = {"LIFELONG_STORE": str(tmp_path / "elsewhere.h5")}
    assert json.loads(cli("status", "--json", "--store", pushed, env=env).stdout)["head"] == 1


def test_without_store_or_env_the_default_is_stores_default_h5(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = cli("log", env={"LIFELONG_STORE": None}, code=1)
    assert str(Path("stores") / "default.h5") in res.stderr
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 8. help, missing store


def test_help_works_in_a_real_process(tmp_path):
    res = subprocess.run(lifelong_cmd() + ["--help"], capture_output=True, text=True, timeout=60,
                         env=process_env(), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for command in ("init", "push", "rollback", "log", "show", "status", "export", "eval"):
        assert re.search(rf"^\s+{command}\s", res.stdout, re.M), res.stdout


def test_push_short_help_describes_its_options():
    res = cli("push", "-h")
    assert "Usage:" in res.stdout and "FILE" in res.stdout
    for opt in ("--dry-run", "--store", "--json"):
        assert opt in res.stdout


@pytest.mark.parametrize("command", [["log"], ["status"], ["show", "1"], ["push", "FACTS"], ["rollback", "--to", "0"],
                                     ["export", "--out", "OUT"], ["eval"]])
def test_every_command_on_a_missing_store_exits_1_with_a_hint_and_creates_nothing(tmp_path, command):
    facts = write_jsonl(tmp_path / "facts.jsonl", FACTS_1)
    missing = tmp_path / "stores" / "none.h5"
    args = [{"FACTS": facts, "OUT": tmp_path / "out"}.get(a, a) for a in command]
    res = cli(*args, "--store", missing, code=1)
    assert str(missing) in res.stderr and "lifelong init" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["facts.jsonl"]


def test_log_on_missing_store_exits_1_with_a_hint_to_run_init(tmp_path):
    missing = tmp_path / "none.h5"
    res = subprocess.run(lifelong_cmd() + ["log", "--store", str(missing)], capture_output=True, text=True,
                         timeout=60, env=process_env(), cwd=tmp_path)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert str(missing) in res.stderr and "lifelong init" in res.stderr
    assert "Traceback" not in res.stderr
    assert not missing.exists()


# ----------------------------------------------------------------------------- 7. SIGKILL during push

# Where a kill's random delay starts counting, and the span it is drawn from:
#   start  - the process start; the whole push (mostly imports and model load);
#   edit   - the "batch N: ..." log line; the rest of the push (values, update, evaluate, store, exit);
#   commit - the last "value k/k" log line; 1.5 x the time from there to the manifest's replacement
#            (evaluate, batch file, manifest), so that some kills land inside the commit itself.
PHASES = ("start", "edit", "commit")


@dataclass
class PushRun:
    """A `lifelong push` subprocess whose stderr lines are timestamped as they arrive."""

    proc: subprocess.Popen
    t0: float                     # time.monotonic() at the start
    wall0: float                  # time.time() at the start (to compare with file mtimes)
    stdout_file: Path
    lines: list[tuple[float, str]] = field(default_factory=list)
    marks: dict[str, threading.Event] = field(default_factory=lambda: {p: threading.Event() for p in PHASES})
    mark_t: dict[str, float] = field(default_factory=dict)

    @classmethod
    def start(cls, store: Path, facts: Path, *extra: str) -> "PushRun":
        out = store.parent / f"push-{time.monotonic_ns()}.stdout"
        with open(out, "wb") as fh:
            wall0, t0 = time.time(), time.monotonic()
            proc = subprocess.Popen(lifelong_cmd() + ["push", str(facts), "--store", str(store), "--no-wait",
                                                      *extra],
                                    stdout=fh, stderr=subprocess.PIPE, env=process_env(),
                                    cwd=store.parent, text=True, errors="replace")
        run = cls(proc, t0, wall0, out)
        run._mark("start")
        threading.Thread(target=run._read_stderr, daemon=True).start()
        return run

    def _mark(self, phase: str) -> None:
        if not self.marks[phase].is_set():
            self.mark_t[phase] = time.monotonic() - self.t0
            self.marks[phase].set()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.monotonic() - self.t0, line.rstrip("\n")))
            if re.match(r"batch \d+: \d+ facts", line):
                self._mark("edit")
            m = re.match(r"value (\d+)/(\d+) ", line)
            if m and m[1] == m[2]:
                self._mark("commit")

    def stderr(self) -> str:
        return "\n".join(f"{t:6.2f} {l}" for t, l in self.lines)


@pytest.fixture(scope="module")
def timed_push(pushed, tmp_path_factory) -> dict:
    """One full `lifelong push --json` subprocess: its stderr lines, and per phase of PHASES
    (when the phase starts, the span a kill delay is drawn from), in seconds."""
    d = tmp_path_factory.mktemp("timing")
    store = copy_store(pushed, d)
    run = PushRun.start(store, write_jsonl(d / "facts2.jsonl", FACTS_2), "--json")
    run.proc.wait(timeout=120)
    total = time.monotonic() - run.t0
    committed = store.stat().st_mtime - run.wall0          # when the new manifest was written
    time.sleep(0.05)  # let the reader thread see the last lines
    assert run.proc.returncode == 0, run.stderr()
    assert json.loads(run.stdout_file.read_text())["batch"] == 2   # stdout of a real process is pure JSON
    assert set(run.mark_t) == set(PHASES), run.stderr()
    t = run.mark_t
    spans = {"start": (0.0, total), "edit": (t["edit"], total - t["edit"]),
             "commit": (t["commit"], 1.5 * max(committed - t["commit"], 0.02))}
    return {"spans": spans, "stderr": [line for _, line in run.lines]}


def test_push_off_a_terminal_logs_plain_lines_without_progress_bars(timed_push):
    bars = [line for line in timed_push["stderr"] if re.search(r"\d+%\|", line)]
    assert bars == []


def _killed_push_trial(pushed: Path, tmp_path: Path, timed: dict, trial: int, phase: str) -> None:
    spans = timed["spans"]
    seed = random.randrange(2**32)
    delay = random.Random(seed).uniform(0, spans[phase][1])
    store = copy_store(pushed, tmp_path / "store")
    objdir = store.with_name(store.name + ".d")
    facts = write_jsonl(tmp_path / "facts2.jsonl", FACTS_2)
    before = log_json(store)

    run = PushRun.start(store, facts)
    deadline = time.monotonic() + 120
    while not run.marks[phase].wait(timeout=0.05):
        if run.proc.poll() is not None or time.monotonic() > deadline:
            run.proc.kill()
            pytest.fail(f"push never reached phase {phase!r} (rc={run.proc.wait()}):\n{run.stderr()}")
    time.sleep(delay)
    run.proc.send_signal(signal.SIGKILL)
    rc = run.proc.wait(timeout=60)
    killed_at = time.monotonic() - run.t0
    debris = sorted(p.name for p in list(store.parent.iterdir()) + list(objdir.iterdir())
                    if ".tmp-" in p.name or p.name == "batch_000002.h5")
    where = (f"trial {trial}, phase {phase}, seed {seed}: SIGKILL {delay:.3f} s after {phase} "
             f"(t={killed_at:.2f} s, rc={rc}, left {debris}; calibration {spans})\n{run.stderr()}")
    assert rc in (0, -signal.SIGKILL), where               # finished, or killed: nothing else

    Store.open(store)                                      # opens (raises StoreError if not)
    after = log_json(store)
    if after != before:
        assert after[:-1] == before and len(after) == len(before) + 1, where
        new = after[-1]
        assert (new["id"], new["status"], new["n_facts"], new["sha256"], new["superseded"]) == \
            (2, "active", len(FACTS_2), sha(facts), []), where
        assert new["source"] == str(facts), where
        assert len(Store.open(store).batch_facts(2)) == len(FACTS_2), where
    else:
        assert rc == -signal.SIGKILL, where                # a finished push must have recorded its batch

    # the next push succeeds, with the next unused id, and sweeps what the kill left
    nxt = json.loads(cli("push", write_jsonl(tmp_path / "facts3.jsonl", [GOOD]), "--store", store,
                         "--json", "--no-wait").stdout)
    assert nxt["batch"] == len(after) + 1, where
    final = log_json(store)
    assert final[:-1] == after and final[-1]["id"] == nxt["batch"], where
    left = [p.name for p in list(store.parent.iterdir()) + list(objdir.iterdir()) if ".tmp-" in p.name]
    assert left == [], where
    print(f"kill {where.splitlines()[0]} -> {'new' if after != before else 'old'}")


@pytest.mark.parametrize("trial, phase", list(enumerate(("start", "edit", "commit", "commit"))))
def test_push_killed_at_a_random_moment_leaves_old_or_new_store(pushed, tmp_path, timed_push, trial, phase):
    _killed_push_trial(pushed, tmp_path, timed_push, trial, phase)


@pytest.mark.slow
@pytest.mark.parametrize("trial, phase", [(i, PHASES[i % 3]) for i in range(25)])
def test_push_killed_at_a_random_moment_leaves_old_or_new_store_many(pushed, tmp_path, timed_push, trial, phase):
    _killed_push_trial(pushed, tmp_path, timed_push, trial, phase)
