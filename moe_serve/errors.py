"""Domain exceptions and the gRPC status code each one becomes at the edge.

Code inside the package raises these; the servicers' error boundary
(`moe_serve.transport.server.error_boundary`) turns them into statuses whose message names
the field and the expected value. Anything else is a bug and becomes INTERNAL.

An error a caller acts on (rather than reports) also has a `Reason`, sent with the status
as the trailing metadata `moe-serve-reason`, so that callers match on it and never on the
message's words, which stay free to change.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

import grpc

REASON_KEY = "moe-serve-reason"  # trailing-metadata key of a status's Reason


class Reason(StrEnum):
    """Why a call failed, where a caller acts on it. The values travel on the wire (trailing
    metadata `moe-serve-reason`) and are stable: add new ones, never rename or reuse one."""

    # FAILED_PRECONDITION: a call names a shared-memory region this connection has not
    # attached (the peer restarted, or the connection is new): attach again, then retry.
    REGION_NOT_ATTACHED = "REGION_NOT_ATTACHED"
    # UNAVAILABLE: the server is shutting down and refuses new calls: retry elsewhere.
    DRAINING = "DRAINING"
    # UNAVAILABLE: the master found no live replica for a needed expert.
    WORKER_UNAVAILABLE = "WORKER_UNAVAILABLE"


def reason_metadata(reason: Reason | None) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that carries `reason` (none without one)."""
    return () if reason is None else ((REASON_KEY, reason.value),)


def reason_of(exc: grpc.RpcError) -> str | None:
    """The `moe-serve-reason` of a failed call, as the server sent it; None without one.

    A string, not a Reason: a newer server may send one this version does not know. Its size
    is bounded by gRPC's limit on metadata (8 KiB by default).
    """
    # A failed sync call's RpcError is also its grpc.Call; grpc.aio raises AioRpcError. Both
    # hold trailing metadata as (key, value) pairs (sync: namedtuples that also have .key).
    trailing: Iterable[tuple[str, str | bytes]] = ()
    if isinstance(exc, grpc.Call | grpc.aio.AioRpcError):
        trailing = exc.trailing_metadata() or ()
    for key, value in trailing:
        if key == REASON_KEY and isinstance(value, str):
            return value
    return None


class MoEError(Exception):
    """Base of every domain error; `code` is the gRPC status it maps to, `reason` what a
    caller matches on, where it acts on this error."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: Reason | None = None


class ConfigError(MoEError):
    """The world config or a command-line argument is invalid (CLI exit code 2)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class InvalidConfigError(MoEError):
    """A reload's new config file does not validate; the message names the field. The old
    world keeps serving."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class RestartNeededError(MoEError):
    """A reload's new config changes what a running server cannot apply live; the message
    names the field. The old world keeps serving."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class InvalidRequestError(MoEError):
    """A request field is malformed; the message names the field and the expected value."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class WireError(InvalidRequestError):
    """A tensor's bytes, dtype or shape cannot be decoded."""


class RequestTooLargeError(MoEError):
    """A request exceeds a configured limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class WorkerUnavailableError(MoEError):
    """A worker needed for a request cannot be reached."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = Reason.WORKER_UNAVAILABLE


class DeadlineError(MoEError):
    """The request's deadline passed while waiting on a worker."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class DrainingError(MoEError):
    """The server is shutting down and did not run the call: retry on another replica."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = Reason.DRAINING
