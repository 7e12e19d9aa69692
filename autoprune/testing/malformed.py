"""A corpus of malformed inputs kept as data, and a runner that hands each one to autoprune the
way a user would. Every case must be rejected cleanly: exit code 2 with an ``error:`` message
(command line) or a 4xx answer (``autoprune serve-latency``), never a traceback, and the server
keeps serving.

Corpus layout (``tests/data/malformed/`` in the repository):

- ``budgets.txt``: one ``autoprune search --budget VALUE`` per line;
- ``search_args.txt``: extra ``autoprune search`` arguments per line (shell syntax; ``{workdir}``,
  ``{closed_port}`` and ``{token_file}`` are filled in);
- ``plans/``: plan files for ``autoprune apply``;
- ``spaces/``: search spaces for ``autoprune search --space``;
- ``tasks/NAME.py.txt``: task files, copied to ``NAME.py`` for ``autoprune layers --task``;
- ``targets/``: target profiles for ``autoprune bench --target``;
- ``requests/*.json``: requests to the latency server: ``method``, ``path``, ``token`` (``good``,
  a wrong one or null), ``meta`` (the JSON request header) or ``raw_meta``, ``headers``,
  ``body`` (``{"text": ...}`` or ``{"model": true}``: a small ONNX model), ``content_length``
  (a value to send instead of the body's length, null for none), ``send`` (``all``, ``none``:
  a silent client, ``partial``: a client that leaves mid-body) and the ``expect``-ed status.

``expected.txt`` names, for every case, a phrase its message must contain: the case's id
(``kind:name``), a tab, the phrase. Lines starting with ``#`` and blank lines are skipped.
``benchmarks/fault_injection.py`` and ``tests/test_malformed.py`` run the same corpus.

Example:
    >>> with MalformedRunner() as runner:  # doctest: +SKIP
    ...     outcomes = [runner.run(case) for case in load_corpus("tests/data/malformed")]
    >>> all(o.rejected for o in outcomes)  # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shlex
import socket
import sys
import tempfile
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = ["Case", "Outcome", "MalformedRunner", "load_corpus"]

SYNTHETIC = "autoprune.testing.tasks:synthetic_task"
_TOKEN = "malformed-corpus-token"
_FAST_TARGET = ("base: cpu-1t\nname: fast\nwarmup_runs: 2\nwarmup_seconds: 0\nmin_runs: 5\n"
                "min_seconds: 0\nmax_seconds: 0.2\n")


@dataclass(frozen=True)
class Case:
    """One malformed input."""

    kind: str  # budget | search | plan | space | task | target | request
    name: str  # the file name or the line itself
    value: Any  # the line (str), the file (Path) or the request (dict)
    expect: str | None = None  # a phrase the message must contain (expected.txt)

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}"


@dataclass
class Outcome:
    """How autoprune answered one case."""

    case: Case  # the case
    rejected: bool  # exit code 2 / the expected 4xx, a message, no traceback
    detail: str  # the exit code or status, and the first line of the message
    output: str = field(default="", repr=False)  # everything printed (stderr, server log)
    message: str = ""  # what the user reads: stderr, or the server's answer

    @property
    def says_why(self) -> bool:
        """The message contains the case's expected phrase."""
        return self.case.expect is not None and self.case.expect in self.message


def load_corpus(root: str | Path) -> list[Case]:
    """Every case under ``root``, in a stable order."""
    root = Path(root)

    def lines(name: str) -> list[str]:
        return [ln.strip() for ln in (root / name).read_text().splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]

    cases = [Case("budget", ln, ln) for ln in lines("budgets.txt")]
    cases += [Case("search", ln, ln) for ln in lines("search_args.txt")]
    for kind, folder in (("plan", "plans"), ("space", "spaces"), ("task", "tasks"),
                         ("target", "targets")):
        cases += [Case(kind, p.name, p) for p in sorted((root / folder).iterdir())]
    cases += [Case("request", p.stem, json.loads(p.read_text()))
              for p in sorted((root / "requests").glob("*.json"))]
    expected = dict(line.split("\t", 1) for line in lines("expected.txt")) if (
        root / "expected.txt").is_file() else {}
    return [replace(c, expect=expected.get(c.id)) for c in cases]


class MalformedRunner:
    """Feeds cases to the CLI (in this process) and to a latency server it starts; a context
    manager (a scratch directory, a fast target profile, the server)."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="autoprune-malformed-")
        self.workdir = Path(self._tmp.name)  # scratch directory for outputs and copies
        self.fast_target = self.workdir / "fast.yaml"  # short measurement protocol
        self.fast_target.write_text(_FAST_TARGET)
        self.token_file = self.workdir / "token"
        self.token_file.write_text(_TOKEN + "\n")
        self._server: Any = None
        self._model: bytes | None = None
        self._runs = 0

    def __enter__(self) -> MalformedRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
        self._tmp.cleanup()

    def run(self, case: Case) -> Outcome:
        """Hand ``case`` to autoprune and judge the answer."""
        if case.kind == "request":
            return self._request(case)
        return self._cli(case, self._argv(case))

    # -- command line ------------------------------------------------------------------------
    def _argv(self, case: Case) -> list[str]:
        self._runs += 1
        out = str(self.workdir / f"run{self._runs}")
        search = ["search", "--task", SYNTHETIC, "--target", str(self.fast_target),
                  "--trials", "1", "--finetune-steps", "1", "--output", out, "--quiet"]
        if case.kind == "budget":
            return [*search, "--budget", case.value]
        if case.kind == "search":
            with socket.socket() as s:  # a port nobody listens on
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            line = case.value.format(workdir=self.workdir, closed_port=port,
                                     token_file=self.token_file)
            return [*search, *shlex.split(line)]
        if case.kind == "plan":
            return ["apply", str(case.value), "--task", SYNTHETIC, "--output", out]
        if case.kind == "space":
            return [*search, "--space", str(case.value)]
        if case.kind == "task":
            path = self.workdir / case.value.name.removesuffix(".txt")
            path.write_text(case.value.read_text())
            return ["layers", "--task", f"{path}:make_task"]
        if case.kind == "target":
            return ["bench", "--task", SYNTHETIC, "--target", str(case.value)]
        raise ValueError(f"unknown case kind {case.kind!r}")

    @staticmethod
    def _cli(case: Case, argv: list[str]) -> Outcome:
        from autoprune.cli import main

        err, out = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code
        except Exception:
            code = None
            err.write(traceback.format_exc())
        text = err.getvalue()
        first = next((ln for ln in text.splitlines() if "error" in ln), text[:200])
        rejected = code == 2 and "error" in text and "Traceback" not in text
        return Outcome(case, rejected, f"exit {code}: {first.strip()[:300]}", text, text)

    # -- latency server ----------------------------------------------------------------------
    def _serve(self) -> tuple[str, int]:
        if self._server is None:
            from autoprune.latency import LatencyServer, export_onnx
            from autoprune.testing.models import create_test_model

            model = create_test_model("resnet_tiny", image_size=16)
            self._model = export_onnx(model, (model.example_inputs()[0][:, :, :16, :16],)
                                      ).onnx_bytes
            self._server = LatencyServer("127.0.0.1", 0, _TOKEN, max_model_bytes=2_000_000,
                                         request_timeout=1.0).start()
        return self._server.address

    def _request(self, case: Case) -> Outcome:
        from autoprune.latency import RemoteTarget

        host, port = self._serve()
        log, handler = io.StringIO(), _Records()
        server_log = logging.getLogger("autoprune.latency.server")
        server_log.addHandler(handler)
        try:
            with contextlib.redirect_stderr(log):
                status, answer = self._send(case.value, host, port)
                healthy = RemoteTarget(f"{host}:{port}", _TOKEN, timeout=10).health()
        finally:
            server_log.removeHandler(handler)
        text = log.getvalue() + "\n".join(handler.lines)
        rejected = (status == case.value.get("expect") and 400 <= status < 500
                    and not handler.tracebacks and "Traceback" not in text
                    and healthy.get("status") == "ok")
        return Outcome(case, rejected, f"HTTP {status}: {answer[:300]}", text, _error(answer))

    def _send(self, spec: dict[str, Any], host: str, port: int) -> tuple[int | None, str]:
        body_spec = spec.get("body") or {}
        body = (self._model if body_spec.get("model") else
                str(body_spec.get("text", "")).encode())
        headers = dict(spec.get("headers") or {})
        token = {"good": _TOKEN}.get(spec.get("token"), spec.get("token"))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if "raw_meta" in spec:
            headers["X-Autoprune-Request"] = spec["raw_meta"]
        elif "meta" in spec:
            headers["X-Autoprune-Request"] = json.dumps(spec["meta"])
        length = spec.get("content_length", len(body)) if "content_length" in spec \
            else len(body) if spec["method"] == "POST" else None
        if length is not None:
            headers["Content-Length"] = str(length)
        head = f"{spec['method']} {spec['path']} HTTP/1.1\r\nHost: {host}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        send = spec.get("send", "all")
        with socket.create_connection((host, port), timeout=30) as sock:
            sock.sendall(head.encode() + (body if send == "all" else
                                          body[:10] if send == "partial" else b""))
            if send == "partial":
                sock.shutdown(socket.SHUT_WR)  # the client leaves mid-body
            reply = b""
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in reply or not _complete(reply):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
        status_line, _, rest = reply.partition(b"\r\n")
        parts = status_line.split()
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        return status, rest.partition(b"\r\n\r\n")[2].decode(errors="replace")


def _error(answer: str) -> str:
    """The ``error`` of a JSON answer as the user reads it; the answer itself otherwise."""
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return str(json.loads(answer)["error"])
    return answer


def _complete(reply: bytes) -> bool:
    head, _, body = reply.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return True


class _Records(logging.Handler):
    """Collects the server's log lines and whether any carried a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.tracebacks = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        self.tracebacks += record.exc_info is not None


if __name__ == "__main__":  # pragma: no cover - python -m autoprune.testing.malformed ROOT
    with MalformedRunner() as runner:
        results = [runner.run(c) for c in load_corpus(sys.argv[1])]
    for o in results:
        print(f"{'ok ' if o.rejected else 'BAD'} {o.case.id}: {o.detail}")
    print(f"malformed inputs rejected: {sum(o.rejected for o in results)} of {len(results)}")
