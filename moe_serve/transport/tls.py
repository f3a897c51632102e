"""TLS on every gRPC port: the servers' credentials and the clients' (SDK, master→worker, probes).

The world config names PEM files (`security.tls`), never their contents. Each process reads
them once at start on its own machine, so every machine may keep its own certificate at the
same path (a Kubernetes secret mounted per pod, say). One certificate serves a process both
ways: the master presents it to clients and, with mutual TLS, to its workers.

    server:  cert + key; with client_auth it also requires a client certificate signed by ca
    client:  verifies the server's certificate against ca (the system's roots without one);
             with client_auth it presents cert + key

Files are checked with Python's `ssl` before gRPC sees them, so a wrong path, a key that
does not match its certificate or a file that is not PEM is a ConfigError naming the key,
not an opaque handshake failure later.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from moe_serve.config import TLSConfig
from moe_serve.errors import ConfigError


def _read(path: Path | str, field: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {str(path)!r}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{field}: {str(path)!r} is not a PEM file (no '-----BEGIN' line)")
    return data


def _check_pair(cert: Path | str, key: Path | str, field: str) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{field}.key: {str(key)!r} is not the private key of {str(cert)!r} "
            f"(or either is not PEM): {exc.reason or exc}"
        ) from None


def _check_ca(ca: Path | str, field: str) -> None:
    try:
        ssl.create_default_context(cafile=str(ca))
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{field}: {str(ca)!r} holds no usable CA certificate: {exc.reason or exc}"
        ) from None


@dataclass(frozen=True)
class ClientTLS:
    """How a client verifies the server it dials and, for mutual TLS, proves who it is.

    `ca`: PEM bundle of the CAs that signed the server's certificate (None: the system's
    roots). `cert`/`key`: this client's certificate chain and key, for servers that
    require one (`security.tls.client_auth`). `server_name`: the name the server's
    certificate must carry, when it is not the host of the address dialled.
    """

    ca: Path | str | None = None
    cert: Path | str | None = None
    key: Path | str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("tls.cert: give cert and key together, or neither")

    @classmethod
    def from_config(cls, cfg: TLSConfig | None) -> ClientTLS | None:
        """The client side of `security.tls` (None when TLS is off): the process's own
        certificate doubles as its client certificate under mutual TLS."""
        if cfg is None:
            return None
        if cfg.client_auth:
            return cls(ca=cfg.ca, cert=cfg.cert, key=cfg.key, server_name=cfg.server_name)
        return cls(ca=cfg.ca, server_name=cfg.server_name)

    def credentials(self, field: str = "tls") -> grpc.ChannelCredentials:
        """gRPC channel credentials; ConfigError naming `field`.ca/cert/key on a bad file."""
        ca = None if self.ca is None else _read(self.ca, f"{field}.ca")
        if self.ca is not None:
            _check_ca(self.ca, f"{field}.ca")
        cert = key = None
        if self.cert is not None and self.key is not None:
            cert, key = _read(self.cert, f"{field}.cert"), _read(self.key, f"{field}.key")
            _check_pair(self.cert, self.key, field)
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )

    def options(self) -> list[tuple[str, str]]:
        """Channel options: the name to check in the server's certificate, when overridden."""
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]

    def checked_name(self, address: str) -> str:
        """The name the certificate of the server at `address` ("host:port") must carry:
        `server_name`, else the address's host."""
        if self.server_name is not None:
            return self.server_name
        return address.rsplit(":", 1)[0].strip("[]")


# How gRPC (BoringSSL) words a failed handshake in a call's details, e.g. "failed to connect
# to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:50061: Custom verification check
# failed with error: UNAUTHENTICATED: Hostname Verification Check failed." (grpcio 1.8x).
_NAME_MISMATCH = ("hostname verification", "peer name", "no match found for server name")
_NOT_TLS = ("wrong_version_number",)
_UNTRUSTED = ("certificate_verify_failed", "certificate verify failed")
_ANY_TLS = ("handshake", "ssl_error", "ssl routines", "tsi_", "certificate")


def handshake_failure(details: str, name: str) -> str | None:
    """What a failed call's gRPC `details` say about the TLS handshake, in an operator's
    words (naming `name`, the name the certificate was checked against, and the config key
    to change), or None when the failure is not the handshake's."""
    low = details.lower()
    if any(s in low for s in _NAME_MISMATCH):
        return (
            f"its certificate does not match the name {name!r} (security.tls.server_name, "
            "or the host of the address when that is unset; the certificate's "
            "subjectAltName must list it)"
        )
    if any(s in low for s in _NOT_TLS):
        return (
            "the peer does not speak TLS on that port (security.tls must be the same on "
            "the master and its workers)"
        )
    if any(s in low for s in _UNTRUSTED):
        return (
            f"its certificate for {name!r} is not signed by a CA in security.tls.ca (or has "
            "expired)"
        )
    if any(s in low for s in _ANY_TLS):
        return f"the TLS handshake with {name!r} failed"
    return None


def server_credentials(cfg: TLSConfig, field: str = "security.tls") -> grpc.ServerCredentials:
    """Credentials for a server port; ConfigError naming the key of a bad file."""
    cert, key = _read(cfg.cert, f"{field}.cert"), _read(cfg.key, f"{field}.key")
    _check_pair(cfg.cert, cfg.key, field)
    ca = None
    if cfg.client_auth:
        assert cfg.ca is not None  # TLSConfig requires it with client_auth
        ca = _read(cfg.ca, f"{field}.ca")
        _check_ca(cfg.ca, f"{field}.ca")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=cfg.client_auth
    )


def channel(
    address: str,
    tls: ClientTLS | None,
    options: Sequence[tuple[str, int | str]] | None = None,
    field: str = "tls",
) -> grpc.Channel:
    """A blocking channel to `address`: TLS with `tls`, plaintext without."""
    opts: list[tuple[str, int | str]] = list(options or [])
    if tls is None:
        return grpc.insecure_channel(address, options=opts)
    return grpc.secure_channel(address, tls.credentials(field), options=opts + tls.options())


def aio_channel(
    address: str,
    tls: ClientTLS | None,
    options: Sequence[tuple[str, int | str]] | None = None,
    field: str = "tls",
) -> grpc.aio.Channel:
    """An asyncio channel to `address`: TLS with `tls`, plaintext without."""
    opts: list[tuple[str, int | str]] = list(options or [])
    if tls is None:
        return grpc.aio.insecure_channel(address, options=opts)
    return grpc.aio.secure_channel(address, tls.credentials(field), options=opts + tls.options())


def check(cfg: TLSConfig | None) -> None:
    """Read and check every file `security.tls` names (at process start, before serving)."""
    if cfg is None:
        return
    server_credentials(cfg)
    client = ClientTLS.from_config(cfg)
    assert client is not None  # cfg is set
    client.credentials("security.tls")
