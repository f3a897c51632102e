"""Bearer-token authentication: one shared token checked on every call but health checks.

The world config names where the token lives (`security.token_env` or
`security.token_file`), never the token; each process reads it once at start. Servers
check the `authorization: Bearer <token>` metadata of every call except the gRPC health
and reflection services, which stay open for probes; the master sends the token to its
workers, and clients pass it to `MoEClient(token=...)`. The token is never logged.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from moe_serve.config import SecurityConfig
from moe_serve.errors import ConfigError

# Methods anyone may call: load balancers and `moe-serve up` probe health without a token.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
HEADER = "authorization"


def load_token(cfg: SecurityConfig) -> str | None:
    """The token the config points at, or None when it names none; ConfigError naming the
    key when the variable is unset, the file unreadable, or the token empty."""
    if cfg.token_env is not None:
        token = os.environ.get(cfg.token_env)
        if token is None:
            raise ConfigError(f"security.token_env: environment variable {cfg.token_env} is unset")
        key = "security.token_env"
    elif cfg.token_file is not None:
        try:
            token = cfg.token_file.read_text()
        except OSError as exc:
            raise ConfigError(f"security.token_file: cannot read {cfg.token_file}: {exc}") from None
        key = "security.token_file"
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
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(OPEN_PREFIXES):
            return await continuation(details)
        sent = next((v for k, v in details.invocation_metadata or () if k == HEADER), "")
        sent_bytes = sent.encode() if isinstance(sent, str) else sent
        if hmac.compare_digest(sent_bytes, self._expected):  # constant time
            return await continuation(details)
        return grpc.unary_unary_rpc_method_handler(_deny)


async def _deny(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        f"{HEADER}: missing or wrong bearer token (metadata 'authorization: Bearer <token>')",
    )
