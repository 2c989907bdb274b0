"""TLS for eftmesh's gRPC links: server credentials (optionally requiring client
certificates: mTLS) and client credentials (a CA bundle, optionally a client certificate).

Everything is off by default: with no certificate configured, servers bind plaintext ports
and clients open insecure channels, as before. Files are PEM; they are read once, when the
server or channel is built, so a renewed certificate takes effect when the process restarts.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {what} {path!r}: {e.strerror or e}") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{what} {path!r} is not a PEM file")
    return data


@dataclass(frozen=True)
class ServerTLS:
    """A server's certificate chain and key; with `client_ca`, clients must present a
    certificate issued by that CA (mTLS), and handshakes without one fail."""

    cert: str
    key: str
    client_ca: str | None = None

    def credentials(self) -> grpc.ServerCredentials:
        pair = [(_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))]
        if self.client_ca is None:
            return grpc.ssl_server_credentials(pair)
        return grpc.ssl_server_credentials(
            pair, root_certificates=_read(self.client_ca, "client CA"), require_client_auth=True)

    def describe(self) -> str:
        return "TLS, client certificates required (mTLS)" if self.client_ca else "TLS"


@dataclass(frozen=True)
class ClientTLS:
    """How a client verifies a server (`ca`: a CA bundle; None: the system roots) and, for
    mTLS, the certificate it presents (`cert` and `key`). `server_name` overrides the name the
    server's certificate must carry (default: the host of the address dialled)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both its certificate and its key")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "CA bundle") if self.ca else None,
            private_key=_read(self.key, "client key") if self.key else None,
            certificate_chain=_read(self.cert, "client certificate") if self.cert else None,
        )

    def options(self, server_name: str | None = None) -> list[tuple[str, Any]]:
        """Channel options naming the certificate's expected host (explicit override first)."""
        name = self.server_name or server_name
        return [("grpc.ssl_target_name_override", name)] if name else []


def channel(address: str, tls: ClientTLS | None, options: Sequence[tuple[str, Any]] = (),
            server_name: str | None = None, **kwargs: Any) -> grpc.Channel:
    """An insecure channel when `tls` is None, else a TLS one (`server_name`: the name the
    certificate must carry when the address is not it, e.g. a replica's IP)."""
    if tls is None:
        return grpc.insecure_channel(address, options=list(options), **kwargs)
    return grpc.secure_channel(address, tls.credentials(), options=[*options, *tls.options(server_name)], **kwargs)


def target_host(target: str) -> str | None:
    """The host name in a target (HOST:PORT, dns:///NAME:PORT, k8s:///SERVICE.NS:PORT); None
    for an IP address or a list of replicas, which name no single certificate host."""
    rest = target.split(":///", 1)[1] if ":///" in target else target
    if "," in rest:
        return None
    host = rest.rsplit(":", 1)[0] if not rest.startswith("[") else None
    if not host or host.replace(".", "").isdigit():
        return None
    return host


# --- command-line flags -------------------------------------------------------------------------


def add_server_args(p: argparse.ArgumentParser, client_ca: bool) -> None:
    """--tls-cert / --tls-key (and, where `client_ca`, --tls-client-ca for mTLS)."""
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="serve TLS with this certificate chain (with --tls-key); default: plaintext. The health-only port stays plaintext (kubelet gRPC probes cannot use TLS)")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="private key of --tls-cert")
    if client_ca:
        p.add_argument("--tls-client-ca", default=None, metavar="PEM", help="require client certificates issued by this CA (mTLS; needs --tls-cert): only holders of a mesh certificate, such as the combiners, can call")


def server_from_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> ServerTLS | None:
    client_ca = getattr(a, "tls_client_ca", None)
    if a.tls_cert is None and a.tls_key is None:
        if client_ca is not None:
            p.error("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if a.tls_cert is None or a.tls_key is None:
        p.error("--tls-cert and --tls-key go together")
    return ServerTLS(a.tls_cert, a.tls_key, client_ca)


def check_server(t: ServerTLS | None, prefix: str = "tls") -> None:
    """Read every file of `t` now, so that a bad one is a ValueError naming its flag
    (--{prefix}-cert, --{prefix}-key, --{prefix}-client-ca) before anything else starts."""
    if t is not None:
        for path, flag in ((t.cert, "cert"), (t.key, "key"), (t.client_ca, "client-ca")):
            if path is not None:
                _read(path, f"--{prefix}-{flag}")


def check_client(t: ClientTLS | None, prefix: str = "tls") -> None:
    """`check_server` for a client's files (--{prefix}-ca, --{prefix}-cert, --{prefix}-key)."""
    if t is not None:
        for path, flag in ((t.ca, "ca"), (t.cert, "cert"), (t.key, "key")):
            if path is not None:
                _read(path, f"--{prefix}-{flag}")


def add_client_args(p: argparse.ArgumentParser, prefix: str = "tls", what: str = "the server") -> None:
    """--{prefix}-ca, --{prefix}-cert, --{prefix}-key (and --{prefix}-server-name)."""
    p.add_argument(f"--{prefix}-ca", default=None, metavar="PEM", help=f"connect to {what} over TLS, trusting this CA bundle (default: plaintext, unless --{prefix}-cert is given)")
    p.add_argument(f"--{prefix}-cert", default=None, metavar="PEM", help=f"client certificate presented to {what} (mTLS; with --{prefix}-key)")
    p.add_argument(f"--{prefix}-key", default=None, metavar="PEM", help=f"private key of --{prefix}-cert")
    p.add_argument(f"--{prefix}-server-name", default=None, metavar="NAME", help=f"host name {what}'s certificate must carry (default: the host dialled)")


def client_from_args(p: argparse.ArgumentParser, a: argparse.Namespace, prefix: str = "tls") -> ClientTLS | None:
    dest = prefix.replace("-", "_")
    ca, cert, key, name = (getattr(a, f"{dest}_{x}") for x in ("ca", "cert", "key", "server_name"))
    if ca is None and cert is None and key is None:
        if name is not None:
            p.error(f"--{prefix}-server-name needs --{prefix}-ca")
        return None
    if (cert is None) != (key is None):
        p.error(f"--{prefix}-cert and --{prefix}-key go together")
    return ClientTLS(ca, cert, key, name)
