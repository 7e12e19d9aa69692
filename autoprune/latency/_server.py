"""`autoprune serve-latency`: measure ONNX models on this device for remote searches.

Protocol (HTTP/1.1, JSON answers):

- ``GET /health`` -> ``{"status": "ok"}`` (no token needed).
- ``GET /info`` (token) -> this device: CPU, cores, ONNX Runtime version and providers,
  the model size cap.
- ``POST /measure`` (token): body = the ONNX model bytes; header ``X-Autoprune-Request`` =
  JSON ``{"version": 1, "inputs": [{"shape": [1, 3, 32, 32], "dtype": "float32"}],
  "target": {...Target fields...}}`` and optionally ``"limit_ms": 1.5`` (a latency budget
  the timing must decide, see ``time_session``). Answers ``{"stats": {...LatencyStats...}}``.

Every request needs ``Authorization: Bearer TOKEN`` except ``/health``. Errors answer
``{"error": "..."}`` with 400 (malformed request or model), 401 (missing or bad token),
404, 408 (the body stalled), 411 (no Content-Length), 413 (model larger than the cap) or 503
(busy for too long).
Only one measurement runs at a time: concurrent timings on one device corrupt each other.

Slow or silent clients: every read waits at most the read timeout (an idle connection is then
closed), and a body must arrive within the read timeout plus one second per 256 KiB. A client
that goes away is one log line, never a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import platform
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from autoprune.errors import TargetError, UsageError
from autoprune.latency import _measure as measuring
from autoprune.latency._protocol import CLIENT_TARGET_FIELDS, PROTOCOL_VERSION, REQUEST_HEADER
from autoprune.latency._target import Target, local_device, resolve_token

__all__ = [
    "LatencyServer",
    "serve",
    "serve_latency",
    "PROTOCOL_VERSION",
    "DEFAULT_PORT",
    "DEFAULT_MAX_MODEL_BYTES",
]

logger = logging.getLogger("autoprune.latency.server")

DEFAULT_PORT = 8765
DEFAULT_MAX_MODEL_BYTES = 256 * 2**20
_MAX_INPUT_ELEMENTS = 64 * 2**20  # per request, all inputs together (memory bound)
_DRAIN_LIMIT = 64 * 2**20  # bytes of a rejected body read and discarded so the client sees why
_MIN_UPLOAD_RATE = 256 * 2**10  # bytes/s a body must keep up on average (on top of the timeout)
DEFAULT_READ_TIMEOUT = 20.0  # seconds a client may stay silent while sending a request
_DTYPES = {"float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"}


class _RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class LatencyServer:
    """An HTTP server that measures ONNX models on this machine, one at a time.

    Example:
        >>> with LatencyServer("127.0.0.1", 0, token="s3cret") as server:  # doctest: +SKIP
        ...     server.start()  # background thread; serve_forever() blocks instead
        ...     print(server.url)
        http://127.0.0.1:40123
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        token: str = "",
        *,
        max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
        max_seconds: float = 120.0,
        queue_timeout: float = 600.0,
        request_timeout: float = DEFAULT_READ_TIMEOUT,
    ):
        """Bind the server (port 0 picks a free port).

        Args:
            host: interface to bind; 127.0.0.1 by default (use 0.0.0.0 for the network).
            port: TCP port.
            token: the shared secret clients send as ``Authorization: Bearer TOKEN``.
            max_model_bytes: larger models are refused with 413.
            max_seconds: cap on one measurement's timing, whatever the client asks.
            queue_timeout: how long a request waits for the running measurement (then 503).
            request_timeout: read timeout: how long one read of a request (or a write of an
                answer) may wait; a body must also arrive within it plus one second per
                256 KiB, else 408.
        """
        if not token or not token.strip():
            raise UsageError("serve-latency needs a non-empty token (--token-file FILE)")
        if not request_timeout > 0:
            raise UsageError(f"the read timeout must be > 0 seconds, got {request_timeout!r}")
        self.token = token.strip()  # the shared secret
        self.max_model_bytes = int(max_model_bytes)  # models above this get 413
        self.max_seconds = float(max_seconds)  # cap on one measurement's timing
        self.queue_timeout = float(queue_timeout)  # wait for the measurement lock, then 503
        self.measure_lock = threading.Lock()  # one measurement at a time
        self.measurements = 0  # measurements served
        handler = type("_Handler", (_Handler,), {"server_state": self, "timeout": request_timeout})
        self._httpd = _HTTPServer((host, port), handler)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown` (or Ctrl-C in the calling thread)."""
        self._httpd.serve_forever()

    def start(self) -> LatencyServer:
        """Serve from a background daemon thread (tests, notebooks)."""
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="autoprune-latency-server", daemon=True
        )
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> LatencyServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def device_info(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {
            "device": local_device(),
            "platform": platform.platform(),
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "onnxruntime": ort.__version__,
            "providers": ort.get_available_providers(),
            "max_model_bytes": self.max_model_bytes,
            "protocol": PROTOCOL_VERSION,
        }


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: tuple) -> None:
        """A client that went away or stalled is one log line; anything else a traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            logger.warning("%s: connection dropped (%s)", client_address[0],
                           type(exc).__name__)
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server_state: LatencyServer  # set on the per-server subclass
    protocol_version = "HTTP/1.1"
    server_version = "autoprune-latency"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.info("%s %s", self.address_string(), format % args)

    # -- plumbing ---------------------------------------------------------------------------
    def _send_json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status == HTTPStatus.UNAUTHORIZED:
                self.send_header("WWW-Authenticate", 'Bearer realm="autoprune-latency"')
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except (ConnectionError, TimeoutError) as exc:
            self.close_connection = True
            # an error answer was logged already: one line per failed request
            logger.log(logging.DEBUG if status >= 400 else logging.WARNING,
                       "%s: client went away before the %d answer (%s)",
                       self.address_string(), status.value, type(exc).__name__)

    def _error(self, status: HTTPStatus, message: str) -> None:
        logger.warning("%s: %d %s", self.address_string(), status.value, message)
        self._send_json(status, {"error": message, "status": status.value})

    def _drain_body(self) -> None:
        """Read and drop an unread request body, so the client can read our answer."""
        if getattr(self, "_body_read", False):
            return
        self._body_read = True
        try:
            remaining = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            remaining = 0
        if remaining > _DRAIN_LIMIT:
            self.close_connection = True
            return
        with contextlib.suppress(OSError):
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 2**20))
                if not chunk:
                    break
                remaining -= len(chunk)
        self.close_connection = True

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        expected = self.server_state.token.encode()
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected)

    def _handle(self, fn: Any) -> None:
        self._body_read = self.command != "POST"
        try:
            fn()
        except _RequestError as exc:
            self._drain_body()
            self._error(exc.status, exc.message)
        except Exception as exc:  # the server keeps serving whatever happens
            logger.exception("internal error")
            self._drain_body()
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {exc}")

    # -- routes -----------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._handle(self._get)

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self._handle(self._post)

    def _get(self) -> None:
        if self.path == "/health":
            self._send_json(HTTPStatus.OK, {"status": "ok", "protocol": PROTOCOL_VERSION})
            return
        if self.path != "/info":
            raise _RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint: GET {self.path}")
        if not self._authorized():
            raise _RequestError(HTTPStatus.UNAUTHORIZED, "missing or invalid token")
        self._send_json(HTTPStatus.OK, self.server_state.device_info())

    def _post(self) -> None:
        state = self.server_state
        if self.path != "/measure":
            raise _RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {self.path}")
        if not self._authorized():
            raise _RequestError(
                HTTPStatus.UNAUTHORIZED,
                "missing or invalid token: send 'Authorization: Bearer TOKEN' with the token "
                "the server was started with",
            )
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            raise _RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            raise _RequestError(
                HTTPStatus.BAD_REQUEST, f"bad Content-Length {length_header!r}"
            ) from None
        if length > state.max_model_bytes:
            raise _RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"model is {length} bytes; this server accepts at most {state.max_model_bytes} "
                "bytes (restart it with a larger --max-model-mb)",
            )
        if length == 0:
            raise _RequestError(HTTPStatus.BAD_REQUEST, "empty body: send the ONNX model bytes")
        meta = self._parse_request_header()
        body = self._read_body(length)
        target, arrays, limit_ms = meta
        if not state.measure_lock.acquire(timeout=state.queue_timeout):
            raise _RequestError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"busy: another measurement ran for more than {state.queue_timeout:.0f} s",
            )
        try:
            stats = self._measure(body, arrays, target, limit_ms)
            state.measurements += 1
        finally:
            state.measure_lock.release()
        self._send_json(HTTPStatus.OK, {"stats": stats.to_dict(), "target": target.key()})

    def _read_body(self, length: int) -> bytes:
        """The request body; 408 when it stalls, 400 when the client closes before its end."""
        self._body_read = True
        start = time.monotonic()
        deadline = start + self.timeout + length / _MIN_UPLOAD_RATE
        chunks, got = [], 0
        try:
            while got < length:
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunk = self.rfile.read1(min(length - got, 2**20))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        except TimeoutError:
            self.close_connection = True
            raise _RequestError(
                HTTPStatus.REQUEST_TIMEOUT,
                f"the request body stalled: {got} of {length} bytes arrived in "
                f"{time.monotonic() - start:.0f} s (read timeout {self.timeout:g} s)",
            ) from None
        except ConnectionError:
            pass  # the client went away: a short body
        if got < length:
            self.close_connection = True
            raise _RequestError(
                HTTPStatus.BAD_REQUEST,
                f"body shorter than Content-Length ({got} of {length} bytes): the client "
                "closed the connection",
            )
        return b"".join(chunks)

    def _parse_request_header(self) -> tuple[Any, list[np.ndarray], float | None]:
        raw = self.headers.get(REQUEST_HEADER)
        if raw is None:
            raise _RequestError(
                HTTPStatus.BAD_REQUEST, f"missing {REQUEST_HEADER} header (JSON request)"
            )
        try:
            meta = json.loads(raw)
        except ValueError as exc:
            raise _RequestError(
                HTTPStatus.BAD_REQUEST, f"{REQUEST_HEADER} is not valid JSON: {exc}"
            ) from None
        if not isinstance(meta, dict):
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"{REQUEST_HEADER} must be a JSON object")
        if meta.get("version") != PROTOCOL_VERSION:
            raise _RequestError(
                HTTPStatus.BAD_REQUEST,
                f"protocol version {meta.get('version')!r} is not supported (server speaks "
                f"{PROTOCOL_VERSION}); use the same autoprune version on both ends",
            )
        target_data = meta.get("target", {})
        if not isinstance(target_data, dict):
            raise _RequestError(HTTPStatus.BAD_REQUEST, "'target' must be a JSON object")
        unknown = sorted(set(target_data) - CLIENT_TARGET_FIELDS)
        if unknown:
            raise _RequestError(
                HTTPStatus.BAD_REQUEST, f"unknown or forbidden target field(s): {unknown}"
            )
        try:
            target = Target.from_dict(target_data, source="request target")
        except (TargetError, TypeError) as exc:
            raise _RequestError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        cap = self.server_state.max_seconds  # the client cannot hold the device longer
        target = dataclasses.replace(
            target,
            max_seconds=min(target.max_seconds, cap),
            min_seconds=min(target.min_seconds, cap),
            warmup_seconds=min(target.warmup_seconds, cap),
        )
        limit_ms = meta.get("limit_ms")
        if limit_ms is not None and (
            isinstance(limit_ms, bool)
            or not isinstance(limit_ms, (int, float))
            or not 0 < limit_ms < float("inf")
        ):
            raise _RequestError(
                HTTPStatus.BAD_REQUEST,
                f"'limit_ms' must be a positive number of milliseconds, got "
                f"{limit_ms!r}",
            )
        return target, self._parse_inputs(meta.get("inputs")), limit_ms

    @staticmethod
    def _parse_inputs(inputs: Any) -> list[np.ndarray]:
        if not isinstance(inputs, list) or not inputs:
            raise _RequestError(
                HTTPStatus.BAD_REQUEST,
                "'inputs' must be a non-empty list of {\"shape\": [...], \"dtype\": \"float32\"}",
            )
        arrays, total = [], 0
        rng = np.random.default_rng(0)
        for i, spec in enumerate(inputs):
            shape = spec.get("shape") if isinstance(spec, dict) else None
            dtype = spec.get("dtype", "float32") if isinstance(spec, dict) else None
            if (
                not isinstance(shape, list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
                or dtype not in _DTYPES
            ):
                raise _RequestError(
                    HTTPStatus.BAD_REQUEST,
                    f"input {i}: expected {{\"shape\": [positive ints], \"dtype\": one of "
                    f"{sorted(_DTYPES)}}}, got {spec!r}",
                )
            total += int(np.prod(shape))
            if total > _MAX_INPUT_ELEMENTS:
                raise _RequestError(
                    HTTPStatus.BAD_REQUEST,
                    f"inputs hold more than {_MAX_INPUT_ELEMENTS} elements in total",
                )
            if dtype.startswith("float"):
                arrays.append(rng.standard_normal(shape).astype(dtype))
            else:
                arrays.append(np.zeros(shape, dtype=dtype))
        return arrays

    @staticmethod
    def _measure(
        onnx_model: bytes, arrays: list[np.ndarray], target: Any, limit_ms: float | None
    ) -> Any:
        try:
            return measuring.measure_onnx(onnx_model, arrays, target, limit_ms)[0]
        except TargetError as exc:
            raise _RequestError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        except Exception as exc:  # ORT rejects the model or the inputs
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:500]
            raise _RequestError(
                HTTPStatus.BAD_REQUEST, f"cannot run the model in ONNX Runtime: {message}"
            ) from None


def serve(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    token: str = "",
    *,
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
    max_seconds: float = 120.0,
    queue_timeout: float = 600.0,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
) -> None:
    """Run a latency server in the foreground until Ctrl-C.

    See :class:`LatencyServer` for the arguments and the module docstring for the protocol.
    """
    server = LatencyServer(
        host,
        port,
        token,
        max_model_bytes=max_model_bytes,
        max_seconds=max_seconds,
        queue_timeout=queue_timeout,
        request_timeout=read_timeout,
    )
    if not _is_loopback(host):
        logger.warning(
            "serving on %s: the token and models travel unencrypted; use it on a trusted "
            "network or behind an SSH tunnel",
            host,
        )
    bound_host, bound_port = server.address
    print(
        f"autoprune latency server on http://{bound_host}:{bound_port} "
        f"(max model {server.max_model_bytes / 2**20:.0f} MiB); measure with "
        f"--target remote://{bound_host}:{bound_port}. Ctrl-C stops it.",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping latency server", flush=True)
    finally:
        server._httpd.server_close()


def serve_latency(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    token_file: str | Path | None = None,
    *,
    max_model_mb: float = DEFAULT_MAX_MODEL_BYTES / 2**20,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
) -> int:
    """Entry point of ``autoprune serve-latency``: blocks until Ctrl-C, returns exit code 0.

    The token comes from ``token_file``, else ``$AUTOPRUNE_LATENCY_TOKEN``.

    Raises:
        TargetError: no token (a :class:`UsageError`, exit code 2).
    """
    token = resolve_token(token_file)
    serve(host, port, token, max_model_bytes=int(max_model_mb * 2**20),
          read_timeout=read_timeout)
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
