"""Every malformed input of the corpus in tests/data/malformed (budgets, search arguments, plans,
spaces, task files, target profiles, latency-server requests) is rejected cleanly: exit code 2
with an error message, or the expected 4xx answer, never a traceback; and the message names
the problem (the case's phrase in expected.txt)."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoprune.testing.malformed import MalformedRunner, load_corpus

CORPUS = load_corpus(Path(__file__).parent / "data" / "malformed")


@pytest.fixture(scope="module")
def runner():
    with MalformedRunner() as r:
        yield r


def test_the_corpus_covers_every_kind_of_input():
    kinds = {c.kind for c in CORPUS}
    assert kinds == {"budget", "search", "plan", "space", "task", "target", "request"}
    assert len(CORPUS) >= 120
    assert [c.id for c in CORPUS if c.expect is None] == []  # every case says what it expects


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_malformed_input_is_rejected_cleanly(runner, case):
    outcome = runner.run(case)
    assert outcome.rejected, f"{outcome.detail}\n{outcome.output}"
    assert "Traceback" not in outcome.output
    assert outcome.says_why, f"expected {case.expect!r} in:\n{outcome.message}"
