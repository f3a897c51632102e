"""Domain exceptions and the gRPC status code each one becomes at the edge.

Code inside the package raises these; the servicers' error boundary
(`moe_serve.rpc.error_boundary`) turns them into statuses whose message names
the field and the expected value. Anything else is a bug and becomes INTERNAL.
"""

from __future__ import annotations

import grpc


class MoEError(Exception):
    """Base of every domain error; `code` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class ConfigError(MoEError):
    """The world config or a command-line argument is invalid (CLI exit code 2)."""

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


class DeadlineError(MoEError):
    """The request's deadline passed while waiting on a worker."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
