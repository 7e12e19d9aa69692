"""The latency server against slow, silent and vanishing clients."""

from __future__ import annotations

import json
import logging
import re
import socket
import struct
import time

import pytest

import autoprune.latency._server as server_module
from autoprune.latency import LatencyServer, RemoteTarget, export_onnx
from autoprune.testing import create_test_model

TOKEN = "hardening-token"
READ_TIMEOUT = 0.5


@pytest.fixture(scope="module")
def onnx_model() -> bytes:
    model = create_test_model("resnet_tiny")
    return export_onnx(model, model.example_inputs()).onnx_bytes


@pytest.fixture
def server():
    with LatencyServer("127.0.0.1", 0, TOKEN, request_timeout=READ_TIMEOUT) as srv:
        srv.start()
        yield srv


@pytest.fixture
def log(caplog):
    caplog.set_level(logging.WARNING, logger="autoprune.latency.server")
    return caplog


def _headers(length: int, min_seconds: float = 0.0) -> bytes:
    meta = {"version": 1, "inputs": [{"shape": [1, 1, 32, 32], "dtype": "float32"}],
            "target": {"warmup_runs": 1, "warmup_seconds": 0, "min_runs": 5,
                       "min_seconds": min_seconds, "max_seconds": max(min_seconds, 0.2)}}
    return (f"POST /measure HTTP/1.1\r\nContent-Length: {length}\r\n"
            f"Authorization: Bearer {TOKEN}\r\nX-Autoprune-Request: {json.dumps(meta)}\r\n\r\n"
            ).encode()


def _reply(sock: socket.socket) -> tuple[bytes, bytes]:
    """(status line, body) of one answer, read to its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += sock.recv(4096)
    return head.split(b"\r\n")[0], body


def _still_serving(server) -> None:
    host, port = server.address
    assert RemoteTarget(f"{host}:{port}", TOKEN, timeout=5).health()["status"] == "ok"


def _no_traceback(log, capfd) -> None:
    assert not any(r.exc_info for r in log.records)
    assert "Traceback" not in capfd.readouterr().err


def test_silent_client_gets_408_after_the_read_timeout(server, onnx_model, log, capfd):
    with socket.create_connection(server.address, timeout=10) as sock:
        start = time.perf_counter()
        sock.sendall(_headers(len(onnx_model)))  # ... and no body
        status, body = _reply(sock)
        waited = time.perf_counter() - start
    assert status == b"HTTP/1.1 408 Request Timeout"
    error = json.loads(body)["error"]
    assert error.startswith(f"the request body stalled: 0 of {len(onnx_model)} bytes")
    assert READ_TIMEOUT <= waited < 5
    assert [r.getMessage() for r in log.records] == [f"127.0.0.1: 408 {error}"]
    _no_traceback(log, capfd)
    _still_serving(server)


def test_trickling_body_is_cut_at_its_deadline(server, onnx_model, monkeypatch, log):
    # deadline: read timeout + size / minimum rate = 0.5 + 2000 / 1000 = 2.5 s
    monkeypatch.setattr(server_module, "_MIN_UPLOAD_RATE", 1000)
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(_headers(2000))
        sock.settimeout(0.2)
        reply, start = b"", time.perf_counter()
        while not reply and time.perf_counter() - start < 8:
            try:
                sock.sendall(b"x")  # one byte every 0.2 s: each read is within the timeout
                reply = sock.recv(4096)
            except (TimeoutError, ConnectionError):
                continue
    assert reply.startswith(b"HTTP/1.1 408")
    (record,) = log.records
    assert re.search(r"stalled: \d+ of 2000 bytes arrived in [34] s \(read timeout 0\.5 s\)",
                     record.getMessage())
    _still_serving(server)


def test_client_gone_mid_body_is_one_log_line(server, onnx_model, log, capfd):
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(_headers(len(onnx_model)) + onnx_model[:100])
    deadline = time.perf_counter() + 5
    while not log.records and time.perf_counter() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # any second line would be logged by now
    assert [r.getMessage() for r in log.records] == [
        f"127.0.0.1: 400 body shorter than Content-Length (100 of {len(onnx_model)} bytes): "
        "the client closed the connection"]
    _no_traceback(log, capfd)
    _still_serving(server)


def test_client_gone_while_measuring_is_one_log_line(server, onnx_model, log, capfd):
    sock = socket.create_connection(server.address, timeout=10)
    sock.sendall(_headers(len(onnx_model), min_seconds=0.5) + onnx_model)
    time.sleep(0.2)  # the measurement runs for 0.5 s
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    sock.close()
    deadline = time.perf_counter() + 10
    while server.measurements == 0 and time.perf_counter() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert server.measurements == 1
    assert [r.getMessage() for r in log.records] == [
        "127.0.0.1: client went away before the 200 answer (ConnectionResetError)"]
    _no_traceback(log, capfd)
    _still_serving(server)


def test_idle_connection_is_closed_after_the_read_timeout(server):
    with socket.create_connection(server.address, timeout=10) as sock:
        start = time.perf_counter()
        assert sock.recv(10) == b""  # closed by the server, nothing sent
        assert READ_TIMEOUT <= time.perf_counter() - start < 5
    _still_serving(server)


def test_read_timeout_must_be_positive():
    with pytest.raises(server_module.UsageError, match="read timeout must be > 0"):
        LatencyServer("127.0.0.1", 0, TOKEN, request_timeout=0)
