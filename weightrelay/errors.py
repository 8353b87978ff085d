"""A worker's refusals, readable by programs: every status a worker aborts with may carry a
`google.rpc.ErrorInfo` (domain `weightrelay`) whose `reason` a client tests instead of the message,
which is written for people and may change.

The reasons (also in docs/contract.md):

- `WORKER_TRAINING`: a Train holds the model; call again when its stream has ended.
"""

from __future__ import annotations

from typing import Mapping, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "weightrelay"
#: The status details' trailer (gRPC's rich error model).
DETAILS_KEY = "grpc-status-details-bin"
#: Error messages longer than this are cut: they may quote what a client sent, and a default
#: client refuses metadata past 16 KiB.
MAX_DETAILS = 1024

WORKER_TRAINING = "WORKER_TRAINING"


def _cut(message: str) -> str:
    if len(message) > MAX_DETAILS:
        message = message[: MAX_DETAILS - 40] + f"... ({len(message)} characters in all)"
    return message


class Refused(Exception):
    """A call the worker refuses: its status code, the message for people, and the reason for programs.

    The worker's helpers raise it; the RPC that called them ends its call with it (abort), so a helper
    never needs the call's context to say no."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "", metadata: Mapping[str, str] | None = None):
        super().__init__(message)
        self.code, self.message, self.reason, self.metadata = code, message, reason, dict(metadata or {})


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str, reason: str = "",
          metadata: Mapping[str, str] | None = None) -> NoReturn:
    """End the call with `code` and `message` (cut to MAX_DETAILS), and with an ErrorInfo of
    `reason` and `metadata` in the status details when a reason is given."""
    message = _cut(message)
    if not reason:
        context.abort(code, message)
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=dict(metadata or {})))
    status = status_pb2.Status(code=code.value[0], message=message, details=[info])
    context.set_trailing_metadata(((DETAILS_KEY, status.SerializeToString()),))
    context.abort(code, message)


def abort_refused(context: grpc.ServicerContext, refused: Refused) -> NoReturn:
    """End the call as `refused` says."""
    abort(context, refused.code, refused.message, refused.reason, refused.metadata)


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The weightrelay ErrorInfo of a failed call, None when it carries none."""
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailers or ():
        if key != DETAILS_KEY:
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except Exception:  # a peer's malformed details are no reason
            return None
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info) and info.domain == DOMAIN:
                return info
    return None


def reason_of(error: grpc.RpcError) -> str:
    """The weightrelay reason of a failed call ('' when it carries none)."""
    info = error_info(error)
    return info.reason if info is not None else ""
