"""Bearer-token authentication: a client token for the master, a worker token for workers.

The world config names where each token lives (`security.token_env`/`token_file` for the
client token, `security.worker_token_env`/`worker_token_file` for the worker token), never
a token; each process reads the ones it needs once at start. The master checks the client
token, the workers the worker token, in the `authorization: Bearer <token>` metadata of
every call except the gRPC health and reflection services, which stay open for probes.
The master sends the worker token to its workers; clients pass theirs to
`MoEClient(token=...)`. A client token therefore never opens ExpertWorker: the workers'
Forward and AttachRegion are reachable only through the master and its limits.
Tokens are never logged.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from moe_serve.config import SecurityConfig
from moe_serve.errors import ConfigError

# Methods anyone may call: load balancers and `moe-serve up` probe health without a token.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
HEADER = "authorization"
# Calls to a worker: refused with a hint that the client token is not the worker token.
WORKER_PREFIX = "/moe_serve.v1.ExpertWorker/"
# grpc.aio.ServerInterceptor.intercept_service is generic over the handler's message types.
Req = TypeVar("Req")
Resp = TypeVar("Resp")


def load_token(cfg: SecurityConfig) -> str | None:
    """The client token the config points at, or None when it names none; ConfigError naming
    the key when the variable is unset, the file unreadable, or the token empty."""
    return _read(cfg.token_env, cfg.token_file, "security.token")


def load_worker_token(cfg: SecurityConfig) -> str | None:
    """The worker token (what workers check and the master sends them), like `load_token`."""
    return _read(cfg.worker_token_env, cfg.worker_token_file, "security.worker_token")


def load_tokens(cfg: SecurityConfig) -> tuple[str | None, str | None]:
    """(client token, worker token), as the master needs both; ConfigError naming
    `security.worker_token_env` when they are the same secret (a client could then call the
    workers directly)."""
    client, worker = load_token(cfg), load_worker_token(cfg)
    if client is not None and client == worker:
        raise ConfigError(
            "security.worker_token_env: the worker token equals the client token; it must be "
            "a different secret, or any client could call the workers directly"
        )
    return client, worker


def _read(env: str | None, file: Path | None, key: str) -> str | None:
    if env is not None:
        token = os.environ.get(env)
        if token is None:
            raise ConfigError(f"{key}_env: environment variable {env} is unset")
        key = f"{key}_env"
    elif file is not None:
        try:
            token = file.read_text()
        except OSError as exc:
            raise ConfigError(f"{key}_file: cannot read {file}: {exc}") from None
        key = f"{key}_file"
    else:
        return None
    token = token.strip()
    if not token:
        raise ConfigError(f"{key}: the token is empty")
    return token


def metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """Call metadata carrying `token`, or None without one."""
    return None if token is None else ((HEADER, f"Bearer {token}"),)


class TokenCheck(grpc.aio.ServerInterceptor):
    """Refuses calls without the right bearer token with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Req, Resp] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Req, Resp] | None:
        if details.method.startswith(OPEN_PREFIXES):
            return await continuation(details)
        sent = next((v for k, v in details.invocation_metadata or () if k == HEADER), "")
        sent_bytes = sent.encode() if isinstance(sent, str) else sent
        if hmac.compare_digest(sent_bytes, self._expected):  # constant time
            return await continuation(details)
        if details.method.startswith(WORKER_PREFIX):
            return grpc.unary_unary_rpc_method_handler(_deny_worker)
        return grpc.unary_unary_rpc_method_handler(_deny)


async def _deny(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        f"{HEADER}: missing or wrong bearer token (metadata 'authorization: Bearer <token>')",
    )


async def _deny_worker(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        f"{HEADER}: missing or wrong bearer token; workers take the worker token "
        "(security.worker_token_env/worker_token_file), which only the master holds, "
        "not the client token",
    )
