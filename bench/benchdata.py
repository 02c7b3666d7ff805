"""The evaluation data benchmarks read: ../shared/data, or $LIFELONG_BENCH_DATA (the product never does);
and where benchmarks keep their stores and reports, wherever they are started from."""
from __future__ import annotations

import os
import re
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPORTS = BENCH / "reports"
WORK = BENCH / "work"            # stores and per-run results (git-ignored)
SHARED = Path(os.environ.get("LIFELONG_BENCH_DATA") or BENCH.parent.parent / "shared" / "data")
WIKI = SHARED / "corpus" / "wikitext2_valid.txt"
WIKI_TEST = SHARED / "corpus" / "wikitext2_test.txt"


def plain_wikitext(dst: Path, lines: int, drop_unk_lines: bool = False, src: Path = WIKI) -> Path:
    """The first `lines` WikiText-2 lines of src (validation: `init --corpus`; test:
    `init --heldout`, text C₀ never saw) made plain: no headings, ' @-@ ' -> '-', and each
    ' <unk>' removed (or, with drop_unk_lines, lines holding one skipped)."""
    out = []
    for line in src.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("=") or (drop_unk_lines and "<unk>" in line):
            continue
        out.append(re.sub(r" @(.)@ ", r"\1", line).replace(" <unk>", ""))
        if len(out) >= lines:
            break
    dst.write_text("\n".join(out) + "\n", encoding="utf-8")
    return dst


def wikitext_test_chunks(tok, n_seq: int, length: int = 128) -> list[list[int]]:
    """The first 400 plain WikiText-2 test lines (as `quality.py` gives `init --heldout`),
    tokenized whole and cut into n_seq chunks of `length` tokens: held-out text for drift."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        text = plain_wikitext(Path(tmp) / "t.txt", lines=400, src=WIKI_TEST).read_text(encoding="utf-8")
    ids = tok(text)["input_ids"]
    return [ids[j:j + length] for j in range(0, n_seq * length, length)]

