"""Connection settings shared by Client and AsyncClient: targets, TLS, retries, channel options."""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, overload

import grpc

PemSource = str | Path | bytes


def _pem(source: PemSource | None) -> bytes | None:
    """PEM bytes from bytes, a path, or PEM text."""
    if source is None or isinstance(source, bytes):
        return source
    text = str(source)
    if text.lstrip().startswith("-----BEGIN"):
        return text.encode()
    return Path(text).read_bytes()


@dataclass(frozen=True)
class TLS:
    """TLS for the channel: a CA to trust (None: the system's roots), and for mutual TLS a client
    certificate chain and key. Each is PEM bytes, PEM text or a file path. ``server_name``
    overrides the name checked against the server certificate (useful with IP targets)."""

    ca: PemSource | None = None
    cert: PemSource | None = None
    key: PemSource | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS: give both cert and key for mutual TLS, or neither")
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.ca), private_key=_pem(self.key), certificate_chain=_pem(self.cert)
        )


@dataclass(frozen=True)
class Retry:
    """Retries with exponential backoff and full jitter, never past the call's deadline.

    ``attempts`` counts the first try. UNAVAILABLE is always retried (the server is
    starting, draining or gone); RESOURCE_EXHAUSTED (queue full) only when asked.
    """

    attempts: int = 4
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    resource_exhausted: bool = False
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"Retry.attempts must be >= 1, got {self.attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("Retry: backoffs must be >= 0 and multiplier >= 1")

    def retryable(self, code: grpc.StatusCode) -> bool:
        return code == grpc.StatusCode.UNAVAILABLE or (
            self.resource_exhausted and code == grpc.StatusCode.RESOURCE_EXHAUSTED
        )

    def delays(self) -> Iterator[float]:
        """The sleep before each retry (``attempts - 1`` of them)."""
        ceiling = self.initial_backoff
        for _ in range(self.attempts - 1):
            yield self.rng.uniform(0, min(ceiling, self.max_backoff))
            ceiling *= self.multiplier


def retry_policy(retries: int | Retry) -> Retry:
    if isinstance(retries, Retry):
        return retries
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int >= 0 or a Retry, got {retries!r}")
    return Retry(attempts=retries + 1)


def _resolve(target: str) -> str:
    """'host:port' -> 'ADDRESS:PORT' (first address the resolver gives), brackets for IPv6."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"target {target!r}: expected host:port")
    host = host.strip("[]")
    family, _, _, _, address = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0]
    return f"[{address[0]}]:{port}" if family == socket.AF_INET6 else f"{address[0]}:{port}"


def channel_target(target: str | Sequence[str]) -> str:
    """A gRPC target: one 'host:port' or URI as given; a list becomes a static address list
    (resolved once, now) that the channel balances round-robin."""
    if isinstance(target, str):
        return target
    if not target:
        raise ValueError("target: give at least one host:port")
    addresses = [_resolve(t) for t in target]
    ipv6 = [a.startswith("[") for a in addresses]
    if any(ipv6) and not all(ipv6):
        raise ValueError("target: mix of IPv4 and IPv6 addresses; use one family")
    return ("ipv6:" if all(ipv6) else "ipv4:") + ",".join(addresses)


def channel_options(max_message_bytes: int, tls: TLS | None) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Spread calls over every address a target resolves to (a list, or dns:/// names).
        ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
        # Find dead connections through proxies and NATs; the server permits this ping rate.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # Reconnect to a restarted replica within seconds, not gRPC's default two minutes.
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 5_000),
        # This client retries itself (Retry); gRPC's transparent retries would double count.
        ("grpc.enable_retries", 0),
    ]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options


COMPRESSION = {None: grpc.Compression.NoCompression, "gzip": grpc.Compression.Gzip, "deflate": grpc.Compression.Deflate}


def compression_of(name: str | None) -> grpc.Compression:
    if name not in COMPRESSION:
        raise ValueError(f"compression must be None, 'gzip' or 'deflate', got {name!r}")
    return COMPRESSION[name]


Options = Sequence[tuple[str, object]]  # gRPC channel arguments
Credentials = grpc.ChannelCredentials | None  # None: plaintext
Compression = grpc.Compression | None


@overload
def open_channel(
    target: str, options: Options, credentials: Credentials, compression: Compression = None, *, aio: Literal[False]
) -> grpc.Channel: ...
@overload
def open_channel(
    target: str, options: Options, credentials: Credentials, compression: Compression = None, *, aio: Literal[True]
) -> grpc.aio.Channel: ...
def open_channel(
    target: str, options: Options, credentials: Credentials, compression: Compression = None, *, aio: bool
) -> grpc.Channel | grpc.aio.Channel:
    """A blocking (``aio=False``) or asyncio channel: TLS when given ``credentials``, plaintext without.

    The one place that picks between gRPC's four channel constructors, for both clients and the load generator."""
    if aio:
        if credentials is None:
            return grpc.aio.insecure_channel(target, options, compression)
        return grpc.aio.secure_channel(target, credentials, options, compression)
    if credentials is None:
        return grpc.insecure_channel(target, options, compression)
    return grpc.secure_channel(target, credentials, options, compression)
