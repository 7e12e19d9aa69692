"""The latency server's wire protocol, shared by the server and its client."""

from __future__ import annotations

import dataclasses

from autoprune.latency._target import Target

__all__ = ["PROTOCOL_VERSION", "REQUEST_HEADER", "CLIENT_TARGET_FIELDS"]

PROTOCOL_VERSION = 1
REQUEST_HEADER = "X-Autoprune-Request"
# Target fields a client may set: all but where the measurement runs (that stays the server's
# business) and the client's token file.
CLIENT_TARGET_FIELDS = {f.name for f in dataclasses.fields(Target)} - {"remote", "token_file"}
