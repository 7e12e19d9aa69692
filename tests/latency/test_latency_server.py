from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import threading
import time

import pytest

import autoprune.latency._measure as measure_module
import autoprune.latency._server as server_module
from autoprune.errors import TargetError, UsageError
from autoprune.latency import (
    TOKEN_ENV_VAR,
    LatencyCache,
    LatencyServer,
    RemoteTarget,
    export_onnx,
    load_target,
    measure_latency,
    serve_latency,
)
from autoprune.testing import create_test_model

TOKEN = "test-token-123"
REQUEST_HEADER = "X-Autoprune-Request"


@pytest.fixture(scope="module")
def server():
    with LatencyServer("127.0.0.1", 0, TOKEN, max_model_bytes=200_000) as srv:
        srv.start()
        yield srv


@pytest.fixture(scope="module")
def onnx_model() -> bytes:
    model = create_test_model("resnet_tiny")
    return export_onnx(model, model.example_inputs()).onnx_bytes  # ~80 kB


def _address(server) -> str:
    host, port = server.address
    return f"{host}:{port}"


def _settings(target) -> dict:
    keep = ("warmup_runs", "warmup_seconds", "min_runs", "min_seconds", "max_runs", "max_seconds")
    return {k: getattr(target, k) for k in keep}


def _post(server, body: bytes, *, token: str | None = TOKEN, meta=None, raw_meta=None):
    host, port = server.address
    headers = {"Content-Type": "application/octet-stream"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if raw_meta is not None:
        headers[REQUEST_HEADER] = raw_meta
    elif meta is not None:
        headers[REQUEST_HEADER] = json.dumps(meta)
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        try:
            conn.request("POST", "/measure", body=body, headers=headers)
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _meta(fast_target) -> dict:
    return {
        "version": 1,
        "inputs": [{"shape": [1, 1, 32, 32], "dtype": "float32"}],
        "target": _settings(fast_target),
    }


def test_health_and_info(server):
    remote = RemoteTarget(_address(server), TOKEN)
    assert remote.health()["status"] == "ok"
    info = remote.info()
    assert info["max_model_bytes"] == 200_000 and "CPUExecutionProvider" in info["providers"]
    with pytest.raises(TargetError, match="rejected the token"):
        RemoteTarget(_address(server), "wrong").info()


def test_remote_measurement_through_measure_latency(server, fast_target, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV_VAR, TOKEN)
    host, port = server.address
    target = dataclasses.replace(load_target(f"remote://{host}:{port}"), **_settings(fast_target))
    model = create_test_model("resnet_tiny")
    cache = LatencyCache()
    before = server.measurements

    stats = measure_latency(model, model.example_inputs(), target, cache=cache)
    again = measure_latency(create_test_model("resnet_tiny"), model.example_inputs(), target,
                            cache=cache)

    assert stats.runs >= fast_target.min_runs and 0 < stats.p50_ms <= stats.p90_ms
    assert again.cached and server.measurements == before + 1


def test_remote_measurement_stops_above_the_budget(server, fast_target, onnx_model):
    target = dataclasses.replace(fast_target, min_runs=10, max_runs=100000, min_seconds=0.1,
                                 max_seconds=5)
    meta = {**_meta(fast_target), "target": {**_settings(target), "target_ci": 0.0001}}
    start = time.perf_counter()
    status, answer = _post(server, onnx_model, meta={**meta, "limit_ms": 1e-6})
    # without the budget, a 0.01 % CI would time until max_seconds (5 s)
    assert status == 200 and answer["stats"]["runs"] % 5 == 0
    assert time.perf_counter() - start < 2


def test_token_file_is_used(server, fast_target, tmp_path, monkeypatch, onnx_model):
    monkeypatch.delenv(TOKEN_ENV_VAR, raising=False)
    host, port = server.address
    bad = tmp_path / "bad"
    bad.write_text("not-the-token\n")
    good = tmp_path / "good"
    good.write_text(TOKEN + "\n")
    spec = f"remote://{host}:{port}"
    model = create_test_model("resnet_tiny")
    fast = _settings(fast_target)
    with pytest.raises(TargetError, match="rejected the token"):
        measure_latency(model, model.example_inputs(),
                        dataclasses.replace(load_target(spec, token_file=bad), **fast))
    stats = measure_latency(model, model.example_inputs(),
                            dataclasses.replace(load_target(spec, token_file=good), **fast))
    assert stats.runs >= 5
    with pytest.raises(TargetError, match="needs a token"):
        measure_latency(model, model.example_inputs(), load_target(spec))


@pytest.mark.parametrize("token", [None, "wrong", ""])
def test_bad_or_missing_token_is_401(server, fast_target, onnx_model, token):
    status, answer = _post(server, onnx_model, token=token, meta=_meta(fast_target))
    assert status == 401
    assert "token" in answer["error"]


def test_oversized_model_is_413(server, fast_target):
    status, answer = _post(server, b"\0" * 300_000, meta=_meta(fast_target))
    assert status == 413
    assert "at most 200000 bytes" in answer["error"]
    remote = RemoteTarget(_address(server), TOKEN)
    with pytest.raises(TargetError, match="413.*--max-model-mb"):
        remote.measure(b"\0" * 300_000, [], fast_target)


def test_huge_upload_is_cut_off_with_a_clear_message(server, fast_target, monkeypatch):
    # Bodies above the drain limit are not read at all: the server answers 413 and closes.
    monkeypatch.setattr(server_module, "_DRAIN_LIMIT", 1000)
    remote = RemoteTarget(_address(server), TOKEN)
    with pytest.raises(TargetError, match="--max-model-mb"):
        remote.measure(b"\0" * 8_000_000, [], fast_target)
    assert remote.health()["status"] == "ok"


@pytest.mark.parametrize(
    ("body", "meta", "match"),
    [
        (b"garbage bytes, not onnx", "ok", "cannot run the model in ONNX Runtime"),
        (b"x", None, "missing X-Autoprune-Request"),
        (b"x", "{not json", "not valid JSON"),
        (b"x", {"version": 99}, "protocol version 99"),
        (b"x", {"version": 1, "inputs": "nope"}, "'inputs' must be a non-empty list"),
        (b"x", {"version": 1, "inputs": [{"shape": [1, -3]}]}, "input 0: expected"),
        (b"x", {"version": 1, "inputs": [{"shape": [1]}], "target": {"remote": "a:1"}},
         "forbidden target field"),
        (b"x", {"version": 1, "inputs": [{"shape": [1]}], "target": {"statistic": "p7"}},
         "statistic must be one of"),
        (b"", "ok", "empty body"),
        (b"x", {"version": 1, "inputs": [{"shape": [1]}], "limit_ms": "2ms"},
         "'limit_ms' must be a positive number"),
    ],
)
def test_garbage_is_400_and_server_keeps_serving(server, fast_target, onnx_model, body, meta,
                                                 match):
    if meta == "ok":
        meta = _meta(fast_target)
    raw = meta if isinstance(meta, str) else None
    status, answer = _post(server, body, meta=None if raw else meta, raw_meta=raw)
    assert status == 400, answer
    assert match in answer["error"]
    # the next good request is answered
    status, answer = _post(server, onnx_model, meta=_meta(fast_target))
    assert status == 200 and answer["stats"]["runs"] >= 5


def test_wrong_input_shape_is_400(server, fast_target, onnx_model):
    meta = _meta(fast_target)
    meta["inputs"] = [{"shape": [1, 3, 32, 32], "dtype": "float32"}]
    status, answer = _post(server, onnx_model, meta=meta)
    assert status == 400 and "cannot run the model" in answer["error"]


def test_truncated_request_and_unknown_path(server):
    host, port = server.address
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /measure HTTP/1.1\r\nContent-Length: 10\r\n"
                     b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\nabc")
        sock.shutdown(socket.SHUT_WR)
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400")
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/nope")
    assert conn.getresponse().status == 404
    conn.close()
    assert RemoteTarget(_address(server), TOKEN).health()["status"] == "ok"


def test_one_measurement_at_a_time(server, fast_target, onnx_model, monkeypatch):
    active, peak = [0], [0]
    lock = threading.Lock()
    real = measure_module.measure_onnx

    def slow(onnx, arrays, target, limit_ms=None):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        try:
            return real(onnx, arrays, target, limit_ms)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(measure_module, "measure_onnx", slow)
    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(_post(server, onnx_model, meta=_meta(fast_target))[0])
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200, 200, 200]
    assert peak[0] == 1


def test_unreachable_server_message():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TargetError, match="cannot reach the latency server.*serve-latency"):
        RemoteTarget(f"127.0.0.1:{port}", TOKEN, timeout=5).health()


def test_server_needs_a_token(monkeypatch, tmp_path):
    with pytest.raises(UsageError, match="non-empty token"):
        LatencyServer("127.0.0.1", 0, "  ")
    monkeypatch.delenv(TOKEN_ENV_VAR, raising=False)
    with pytest.raises(TargetError, match="needs a token"):
        serve_latency("127.0.0.1", 0, None)
