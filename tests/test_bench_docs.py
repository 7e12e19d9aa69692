"""The docs' measured numbers are rendered from results files, and every results file says
where and when it ran."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_docs  # noqa: E402
import provenance  # noqa: E402

RESULTS = sorted(provenance.RESULTS.glob("*.json"))


def test_make_bench_docs_check_passes():
    run = subprocess.run(["make", "-s", "bench-docs-check"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_docs_quote_results_files():
    for doc in bench_docs.DOCS:
        assert len(bench_docs.BLOCK.findall(doc.read_text())) >= 5, doc


@pytest.mark.parametrize("doc", bench_docs.DOCS, ids=lambda d: d.name)
def test_a_number_edited_by_hand_fails_the_check(doc, tmp_path):
    text = doc.read_text()
    # the first digit inside a rendered table or value block, changed
    block = next(m for m in bench_docs.BLOCK.finditer(text)
                 if m.group(1) in ("table", "value") and re.search(r"\d", m.group(3)))
    at = block.start(3) + re.search(r"\d", block.group(3)).start()
    edited = text[:at] + str((int(text[at]) + 1) % 10) + text[at + 1:]
    copy = doc.parent / f".edited-{doc.name}"  # beside it: its links are relative
    try:
        copy.write_text(text)
        assert bench_docs.main(["--check", str(copy)]) == 0
        copy.write_text(edited)
        assert bench_docs.main(["--check", str(copy)]) == 1
    finally:
        copy.unlink()


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_every_results_file_says_where_and_when_it_ran(path):
    record = json.loads(path.read_text())
    assert set(provenance.REQUIRED) <= record.keys()
    assert re.fullmatch(r"[0-9a-f]{7,40}", record["commit"])
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d", record["date"])
    assert record["command"].split()[1].startswith("benchmarks/")
    assert record["machine"]["cores"] >= 1 and record["machine"]["cpu"]
    assert len(record["load"]["before"]) == 3
    assert record["busy"] == provenance.is_busy(record)
    assert (provenance.RESULTS / record["log"]).is_file()


def test_every_raw_log_has_its_results_file():
    logs = {p.name for p in provenance.RESULTS.glob("*.txt")}
    assert logs == {json.loads(p.read_text())["log"] for p in RESULTS}


def test_tables_are_named_by_their_label_or_their_order():
    text = "x\n\ntable: speed\n\n| a | b |\n|---|---:|\n| 1 | 2 |\n\n| c |\n|---|\n| 3 |\n"
    tables = provenance.parse_tables(text)
    assert tables == {"speed": {"columns": ["a", "b"], "align": ["left", "right"],
                                "rows": [["1", "2"]]},
                      "table2": {"columns": ["c"], "align": ["left"], "rows": [["3"]]}}


def test_the_readme_refuses_a_busy_run(tmp_path, monkeypatch):
    busy = json.loads(RESULTS[0].read_text())
    busy["load"]["before"] = [9.0, 9.0, 9.0]
    busy["busy"] = True
    monkeypatch.setattr(bench_docs, "load_results", lambda name: busy)
    with pytest.raises(bench_docs.RenderError, match="busy machine"):
        bench_docs.render_block("source", ["any"], bench_docs.HEADLINE)
    assert "**Busy machine**" in bench_docs.render_block("source", ["any"], bench_docs.DOCS[1])
