"""Client of `autoprune serve-latency`: measure on a remote device (``remote://host:port``)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autoprune.errors import ExportError, TargetError
from autoprune.latency._protocol import CLIENT_TARGET_FIELDS, PROTOCOL_VERSION, REQUEST_HEADER
from autoprune.latency._stats import LatencyStats
from autoprune.latency._target import Target, _parse_address, resolve_token

__all__ = ["RemoteTarget", "measure_remote"]


@dataclass(frozen=True)
class RemoteTarget:
    """A connection to an ``autoprune serve-latency`` server.

    Example:
        >>> remote = RemoteTarget("192.168.1.20:8765", token="s3cret")  # doctest: +SKIP
        >>> remote.health()  # doctest: +SKIP
        {'status': 'ok', 'protocol': 1}
        >>> stats = remote.measure(onnx_bytes, [x.numpy()], target)  # doctest: +SKIP
    """

    address: str  # "host:port" of the server
    token: str = field(repr=False)  # shared secret (Authorization: Bearer TOKEN)
    timeout: float = 300.0  # seconds to wait for an answer (a measurement takes a while)

    @classmethod
    def from_target(cls, target: Target) -> RemoteTarget:
        """The server a ``remote://`` target names, with its token (file or env var)."""
        if target.remote is None:
            raise TargetError(f"target {target.name!r} is not a remote target")
        return cls(target.remote, resolve_token(target.token_file))

    def health(self) -> dict[str, Any]:
        """``GET /health`` (no token needed): ``{"status": "ok", ...}``."""
        return self._request("GET", "/health", auth=False)

    def info(self) -> dict[str, Any]:
        """``GET /info``: the device, ONNX Runtime version and providers, model size cap."""
        return self._request("GET", "/info")

    def measure(
        self,
        onnx_model: bytes,
        arrays: Sequence[np.ndarray],
        target: Target,
        limit_ms: float | None = None,
    ) -> LatencyStats:
        """Measure ``onnx_model`` on the server with ``target``'s settings.

        Only input shapes and dtypes travel; the server times random inputs of those shapes.
        ``limit_ms``: a latency budget the timing must decide (see ``time_session``).

        Raises:
            TargetError: unreachable server, bad token, model over the size cap.
            ExportError: the server's ONNX Runtime cannot load or run the model.
        """
        settings = {
            k: v for k, v in target.to_dict().items() if k in CLIENT_TARGET_FIELDS
        }
        request = {
            "version": PROTOCOL_VERSION,
            "inputs": [{"shape": list(a.shape), "dtype": str(a.dtype)} for a in arrays],
            "target": settings,
        }
        if limit_ms is not None:
            request["limit_ms"] = limit_ms
        answer = self._request(
            "POST",
            "/measure",
            body=onnx_model,
            headers={
                "Content-Type": "application/octet-stream",
                REQUEST_HEADER: json.dumps(request),
            },
        )
        try:
            return LatencyStats.from_dict(answer["stats"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TargetError(
                f"latency server at {self.address} sent an unexpected answer: {exc}"
            ) from None

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
    ) -> dict[str, Any]:
        host, port = _parse_address(self.address)
        headers = dict(headers or {})
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        upload_cut = False
        try:
            try:
                conn.request(method, path, body=body, headers=headers)
            except (BrokenPipeError, ConnectionResetError):
                # The server refused the body early (oversized model) and closed the socket;
                # its answer may still be readable.
                upload_cut = True
            response = conn.getresponse()
            status = response.status
            raw = response.read()
        except (ConnectionError, TimeoutError, OSError, http.client.HTTPException) as exc:
            if upload_cut:
                raise TargetError(
                    f"the latency server at {self.address} closed the connection while the "
                    f"{len(body or b'')}-byte model was uploading: most likely the model is "
                    "larger than the server accepts (start it with a larger --max-model-mb)"
                ) from None
            raise TargetError(
                f"cannot reach the latency server at {self.address} ({exc}); start it on the "
                f"device with `autoprune serve-latency --host 0.0.0.0 --port {port} "
                "--token-file FILE`, and check the address and firewall"
            ) from None
        finally:
            conn.close()
        try:
            payload = json.loads(raw) if raw else {}
        except ValueError:
            payload = {"error": raw[:200].decode(errors="replace")}
        if status == 200:
            return payload
        message = payload.get("error", f"HTTP {status}") if isinstance(payload, dict) else raw
        if status == 401:
            raise TargetError(
                f"the latency server at {self.address} rejected the token: {message}. Use the "
                "server's token via --token-file FILE or AUTOPRUNE_LATENCY_TOKEN"
            )
        if status == 400 and path == "/measure" and "ONNX Runtime" in str(message):
            raise ExportError(f"the remote device at {self.address} cannot run the model: "
                              f"{message}")
        if status == 404:
            raise TargetError(f"{self.address} answered 404 to {method} {path} ({message}): it "
                              "is not an `autoprune serve-latency` server of this autoprune "
                              "version; check the address and port")
        raise TargetError(f"the latency server at {self.address} answered {status}: {message}")


def measure_remote(
    onnx_model: bytes,
    arrays: Sequence[np.ndarray],
    target: Target,
    limit_ms: float | None = None,
) -> LatencyStats:
    """Measure on the server a ``remote://host:port`` target names."""
    return RemoteTarget.from_target(target).measure(onnx_model, arrays, target, limit_ms)
