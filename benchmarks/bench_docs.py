"""Render the docs' measured numbers from the results files in ``benchmarks/results/``.

The docs hold marked blocks; everything between a marker and ``<!-- /results -->`` is
generated (run ``make bench-docs``), the prose around them is hand-written:

- ``<!-- results:source FILE -->``: the run's command, date, commit, machine and load.
- ``<!-- results:table FILE TABLE [cols=1,2,4] [rows=1-3] -->``: a table the benchmark printed.
- ``<!-- results:value FILE NAME [fmt=.4f] -->`` or
  ``<!-- results:value FILE TABLE ROW COLUMN -->``: one figure, inline (NAME: a value, ``a.b``
  inside a value that is a dict; ROW: the first cell's text or a 1-based number; COLUMN: the
  header or a 1-based number; quote arguments with spaces).
- ``<!-- results:log FILE [lines=5-9,40-] -->``: lines of the raw log (``...`` marks a gap).

FILE is a results file's name without ``.json``. ``--check`` exits 1 when a doc differs from
what its files render (a number edited by hand, or a results file changed). The README is the
headline: it may not quote a run the results file marks busy.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import RESULTS, ROOT, load_results  # noqa: E402

DOCS = [ROOT / "README.md", ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "transformers.md",
        ROOT / "docs" / "recovery.md"]
HEADLINE = ROOT / "README.md"
BLOCK = re.compile(r"<!-- results:(\w+) (.*?) -->(.*?)<!-- /results -->", re.DOTALL)


class RenderError(Exception):
    pass


def _spans(spec: str, n: int) -> list[int]:
    """1-based line numbers from ``5-9,12,40-`` (an open end runs to ``n``)."""
    out: list[int] = []
    for part in spec.split(","):
        a, dash, b = part.partition("-")
        lo = int(a) if a else 1
        hi = (int(b) if b else n) if dash else lo
        out += range(lo, min(hi, n) + 1)
    return out


def _options(args: list[str]) -> tuple[list[str], dict[str, str]]:
    plain = [a for a in args if "=" not in a]
    return plain, dict(a.split("=", 1) for a in args if "=" in a)


def _table(record: dict[str, Any], name: str) -> dict[str, Any]:
    tables = record["tables"]
    if name not in tables:
        raise RenderError(f"no table {name!r} (it has: {', '.join(tables) or 'none'})")
    return tables[name]


def _index(items: list[str], key: str, what: str) -> int:
    if key.isdigit():
        return int(key) - 1
    plain = [re.sub(r"[*`]", "", i) for i in items]  # cells as read, without Markdown marks
    key = re.sub(r"[*`]", "", key)
    if key in plain:
        return plain.index(key)
    raise RenderError(f"no {what} {key!r} (there are: {', '.join(plain)})")


def _value(record: dict[str, Any], name: str, key: str) -> Any:
    """A named value; ``a.b`` reaches into a value that is a dict."""
    values = record["values"]
    if key in values:
        return values[key]
    head, _, rest = key.partition(".")
    if rest and isinstance(values.get(head), dict) and rest in values[head]:
        return values[head][rest]
    raise RenderError(f"{name} has no value {key!r} (it has: {', '.join(values) or 'none'})")


def _formatted(value: Any, fmt: str | None) -> str:
    return format(value, fmt) if fmt else str(value)


def source(record: dict[str, Any], doc: Path) -> str:
    m = record["machine"]
    before, after = record["load"]["before"], record["load"]["after"]
    load = f"load average {before[0]:g}" + (f" before, {after[0]:g} after" if after else "")
    busy = " **Busy machine** (load above the core count): slower, noisier times." \
        if record["busy"] else ""
    machine = ", ".join([f"{m['cores']} cores ({m['cpu']})",
                         *([f"{m['memory_gib']} GiB"] if m.get("memory_gib") else []),
                         *([f"torch {m['torch']}"] if m.get("torch") else []),
                         *([f"ONNX Runtime {m['onnxruntime']}"] if m.get("onnxruntime")
                           else [])])
    return (f"`{record['command']}`, {record['date']}, commit {record['commit']}"
            f"{' (uncommitted changes)' if record['dirty'] else ''}; {machine}; {load}. "
            f"Raw output: "
            f"[`{record['log']}`]({os.path.relpath(RESULTS / record['log'], doc.parent)})."
            f"{busy}")


def render_block(kind: str, args: list[str], doc: Path) -> str:
    if not args:
        raise RenderError(f"results:{kind} needs a results file name")
    record = load_results(args[0])
    if doc.name == HEADLINE.name and record["busy"]:
        raise RenderError(f"{args[0]} ran on a busy machine; the README quotes no such run")
    plain, opts = _options(args[1:])
    if kind == "source":
        return "\n" + source(record, doc) + "\n"
    if kind == "value":
        if len(plain) == 1:
            return _formatted(_value(record, args[0], plain[0]), opts.get("fmt"))
        table = _table(record, plain[0])
        row = _index([r[0] for r in table["rows"]], plain[1], "row")
        return table["rows"][row][_index(table["columns"], plain[2], "column")]
    if kind == "table":
        table = _table(record, plain[0])
        n = len(table["columns"])
        cols = [int(c) - 1 for c in opts["cols"].split(",")] if "cols" in opts else range(n)
        rows = table["rows"]
        if "rows" in opts:
            rows = [rows[i - 1] for i in _spans(opts["rows"], len(rows))]
        lines = ["| " + " | ".join(table["columns"][c] for c in cols) + " |",
                 "|" + "|".join("---:" if table["align"][c] == "right" else "---"
                                for c in cols) + "|"]
        lines += ["| " + " | ".join(r[c] if c < len(r) else "" for c in cols) + " |"
                  for r in rows]
        return "\n\n" + "\n".join(lines) + "\n\n"  # blank lines: a block of its own
    if kind == "log":
        log = (RESULTS / record["log"]).read_text().splitlines()
        keep = _spans(opts.get("lines", "1-"), len(log))
        out, last = [], 0
        for i in keep:
            if last and i != last + 1:
                out.append("...")
            out.append(log[i - 1])
            last = i
        return "\n\n```text\n" + "\n".join(out) + "\n```\n\n"
    raise RenderError(f"unknown block results:{kind} (source, table, value or log)")


def render(doc: Path) -> str:
    text = doc.read_text()

    def one(m: re.Match) -> str:
        try:
            body = render_block(m.group(1), shlex.split(m.group(2)), doc)
        except (RenderError, FileNotFoundError, KeyError, IndexError, ValueError) as e:
            line = text[:m.start()].count("\n") + 1
            raise RenderError(f"{doc.relative_to(ROOT)}:{line}: {e}") from None
        return f"<!-- results:{m.group(1)} {m.group(2)} -->{body}<!-- /results -->"

    return BLOCK.sub(one, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a doc differs from what its results files render")
    parser.add_argument("docs", nargs="*", type=Path, default=DOCS)
    args = parser.parse_args(argv)
    stale = []
    for doc in args.docs:
        doc = doc.resolve()
        try:
            new = render(doc)
        except RenderError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        old = doc.read_text()
        if new == old:
            continue
        if args.check:
            stale.append(doc)
            sys.stdout.writelines(difflib.unified_diff(
                old.splitlines(True), new.splitlines(True), f"{doc.name} (as written)",
                f"{doc.name} (rendered from benchmarks/results)"))
        else:
            doc.write_text(new)
            print(f"rendered {doc.relative_to(ROOT)}")
    if stale:
        print(f"\n{len(stale)} doc(s) differ from their results files: run `make bench-docs`",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
