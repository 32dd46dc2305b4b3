"""Server settings: one typed object built from defaults, a TOML file, LRNSERVE_* and flags.

Precedence (lowest to highest): built-in defaults, the TOML file, environment
variables, command-line flags. A file with a ``[models]`` table replaces the
embedded default model repository. Every problem is a ``ConfigError`` whose
message names the offending key (``models.alexnet.max_batch_size``) or variable.

    [server]
    host = "0.0.0.0"            # LRNSERVE_HOST
    grpc_port = 8001            # LRNSERVE_GRPC_PORT; 0 picks a free port
    metrics_port = 8002         # LRNSERVE_METRICS_PORT; 0 picks a free port
    metrics_enabled = true      # LRNSERVE_METRICS_ENABLED: Prometheus endpoint and metrics
    device = "auto"             # LRNSERVE_DEVICE: auto | cpu | cuda | cuda:N
    grace_seconds = 30          # LRNSERVE_GRACE_SECONDS: drain time on SIGTERM
    log_level = "info"          # LRNSERVE_LOG_LEVEL
    max_message_bytes = 268435456   # LRNSERVE_MAX_MESSAGE_BYTES: largest gRPC message either way
    max_tensor_bytes = 268435456    # LRNSERVE_MAX_TENSOR_BYTES: per input tensor
    max_tensor_elements = 67108864  # LRNSERVE_MAX_TENSOR_ELEMENTS: per input tensor
    max_inflight_bytes = 2147483648 # LRNSERVE_MAX_INFLIGHT_BYTES: input bytes of all requests being handled
    tls_cert = "server.pem"     # LRNSERVE_TLS_CERT: serve gRPC over TLS with this certificate chain...
    tls_key = "server.key"      # LRNSERVE_TLS_KEY: ...and key
    tls_client_ca = "ca.pem"    # LRNSERVE_TLS_CLIENT_CA: require client certificates from this CA (mTLS)
    metrics_tls = false         # LRNSERVE_METRICS_TLS: serve /metrics over HTTPS with the same certificate
    plaintext = false           # LRNSERVE_PLAINTEXT: serve without TLS; required when no certificate is set
    token_file = "token"        # LRNSERVE_TOKEN_FILE (or the token itself in LRNSERVE_TOKEN): require
                                # "authorization: Bearer <token>" on every RPC but health

    [models.lrn]                # the table name is the served model name
    kind = "lrn"                # lrn | alexnet | caffenet | googlenet | cifar10_full | zfnet512
    mode = "across"             # lrn only: defaults for the request parameters
    size = 5
    alpha = 1e-4
    beta = 0.75
    k = 1.0
    max_batch_size = 32         # samples per batch
    max_queue_delay_us = 2000   # how long the oldest request may wait for a fuller batch; spent
                                # only while more requests are expected (fewer are queued than were
                                # lately in the batcher at once), so a lone caller never waits; 0:
                                # never wait (batches still form from what queues while one runs)
    max_queue_size = 256        # queued requests before RESOURCE_EXHAUSTED
    max_request_samples = 1024  # samples (N) one request may carry
    instances = 0               # concurrent batches (worker threads / CUDA streams); 0 = choose:
                                # networks on the CPU min(cores, 4), otherwise 1
    threads = 0                 # CPU: intra-op threads per instance; 0 = the cores shared out
                                # (torch's thread count // instances, at least 1)
    device = "auto"             # overrides [server].device for this model
    dtype = "float32"           # networks: compute dtype (float32 | float16 | bfloat16 | float64)
    weights = "alexnet.pt"      # networks: state dict or .safetensors; absent = seeded random
    seed = 0                    # networks: seed of the random weights
"""

from __future__ import annotations

import contextlib
import hmac
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from lrnserve.client._allocator import DEFAULT_CACHE_BYTES

from .ops import LRNParams

KINDS = ("lrn", "alexnet", "caffenet", "googlenet", "cifar10_full", "zfnet512")
DTYPES = ("float32", "float16", "bfloat16", "float64")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem; the message starts with the key or variable at fault."""


class Secret:
    """A credential that never shows up in logs, reprs or tracebacks."""

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return 0


@dataclass(frozen=True)
class BatchingPolicy:
    max_batch_size: int = 32
    max_queue_delay_us: int = 2000
    max_queue_size: int = 256
    max_request_samples: int = 1024


@dataclass(frozen=True)
class ModelConfig:
    name: str
    kind: str
    device: str = "auto"
    dtype: str = "float32"
    instances: int = 0  # 0: chosen for the model's kind and device (executor.instance_layout)
    threads: int = 0  # CPU intra-op threads per instance; 0: torch's thread count // instances
    weights: Path | None = None
    seed: int = 0
    batching: BatchingPolicy = field(default_factory=BatchingPolicy)
    lrn: LRNParams = field(default_factory=LRNParams)


@dataclass(frozen=True)
class ServerSettings:
    host: str = "0.0.0.0"
    grpc_port: int = 8001
    metrics_port: int = 8002
    device: str = "auto"
    grace_seconds: float = 30.0
    log_level: str = "info"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_tensor_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_tensor_elements: int = 64 * 1024 * 1024
    max_inflight_bytes: int = 2 * 1024 * 1024 * 1024
    allocator_cache_bytes: int = DEFAULT_CACHE_BYTES  # freed memory the C heap may keep for reuse; 0: glibc's default
    metrics_enabled: bool = True
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    metrics_tls: bool = False
    plaintext: bool = False
    token_file: Path | None = None
    token: Secret | None = None
    models: tuple[ModelConfig, ...] = field(default_factory=lambda: default_models())


def default_models() -> tuple[ModelConfig, ...]:
    """The embedded model repository served when no config names models."""
    return tuple(ModelConfig(name=kind, kind=kind) for kind in KINDS)


# ---- value checkers: (key, raw value) -> typed value, or ConfigError naming key ----


def _integer(key: str, value: object, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ConfigError(f"{key}: expected an integer >= {minimum}{upper}, got {value}")
    return value


def _number(key: str, value: object, minimum: float) -> float:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value.strip())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{key}: expected a number >= {minimum}, got {value}")
    return float(value)


def _choice(key: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
    return value.lower()


def _text(key: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
    return value.strip()


def _boolean(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.strip().lower() in ("1", "true", "yes", "on")
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _device(key: str, value: object) -> str:
    text = _text(key, value).lower()
    if text in ("auto", "cpu", "cuda"):
        return text
    if text.startswith("cuda:") and text[5:].isdigit():
        return text
    raise ConfigError(f"{key}: expected auto, cpu, cuda or cuda:N, got {value!r}")


def _file(key: str, value: object) -> Path:
    path = Path(_text(key, value))
    if not path.is_file():
        raise ConfigError(f"{key}: file {path} does not exist")
    return path


_SERVER_KEYS: dict[str, Callable[[str, object], Any]] = {
    "host": _text,
    "grpc_port": lambda k, v: _integer(k, v, 0, 65535),
    "metrics_port": lambda k, v: _integer(k, v, 0, 65535),
    "device": _device,
    "grace_seconds": lambda k, v: _number(k, v, 0.0),
    "log_level": lambda k, v: _choice(k, v, LOG_LEVELS),
    "max_message_bytes": lambda k, v: _integer(k, v, 1024, 2**31 - 1),
    "max_tensor_bytes": lambda k, v: _integer(k, v, 1, None),
    "max_tensor_elements": lambda k, v: _integer(k, v, 1, None),
    "max_inflight_bytes": lambda k, v: _integer(k, v, 1, None),
    "allocator_cache_bytes": lambda k, v: _integer(k, v, 0, 2**62),
    "metrics_enabled": _boolean,
    "tls_cert": _file,
    "tls_key": _file,
    "tls_client_ca": _file,
    "metrics_tls": _boolean,
    "plaintext": _boolean,
    "token_file": _file,
}
_PATH_KEYS = ("tls_cert", "tls_key", "tls_client_ca", "token_file")

_MODEL_KEYS = (
    "kind",
    "device",
    "dtype",
    "instances",
    "threads",
    "weights",
    "seed",
    "max_batch_size",
    "max_queue_delay_us",
    "max_queue_size",
    "max_request_samples",
    "mode",
    "size",
    "alpha",
    "beta",
    "k",
)
_LRN_ONLY = ("mode", "size", "alpha", "beta", "k")
_NETWORK_ONLY = ("weights", "seed", "dtype")

ENV_PREFIX = "LRNSERVE_"


def _reject_unknown(prefix: str, table: Mapping[str, object], known: tuple[str, ...]) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key; expected one of {', '.join(known)}")


def _table(key: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table, got {value!r}")
    return value


def _model(name: str, table: Mapping[str, Any], base_dir: Path) -> ModelConfig:
    prefix = f"models.{name}."
    _reject_unknown(prefix, table, _MODEL_KEYS)
    kind = _choice(prefix + "kind", table.get("kind", name), KINDS)
    misplaced = _NETWORK_ONLY if kind == "lrn" else _LRN_ONLY
    for key in misplaced:
        if key in table:
            raise ConfigError(f"{prefix}{key}: not a setting of a {kind!r} model")
    defaults = BatchingPolicy()
    batching = BatchingPolicy(
        max_batch_size=_integer(prefix + "max_batch_size", table.get("max_batch_size", defaults.max_batch_size), 1),
        max_queue_delay_us=_integer(
            prefix + "max_queue_delay_us", table.get("max_queue_delay_us", defaults.max_queue_delay_us), 0
        ),
        max_queue_size=_integer(prefix + "max_queue_size", table.get("max_queue_size", defaults.max_queue_size), 1),
        max_request_samples=_integer(
            prefix + "max_request_samples", table.get("max_request_samples", defaults.max_request_samples), 1
        ),
    )
    weights = table.get("weights")
    weights_path = None
    if weights is not None:
        weights_path = Path(_text(prefix + "weights", weights))
        if not weights_path.is_absolute():
            weights_path = base_dir / weights_path
        if not weights_path.is_file():
            raise ConfigError(f"{prefix}weights: file {weights_path} does not exist")
    lrn = LRNParams()
    if kind == "lrn":
        try:
            lrn = LRNParams(
                size=table.get("size", lrn.size),
                alpha=table.get("alpha", lrn.alpha),
                beta=table.get("beta", lrn.beta),
                k=table.get("k", lrn.k),
                mode=table.get("mode", lrn.mode),
            )
        except ValueError as exc:
            raise ConfigError(f"{prefix}{str(exc).split(' ', 1)[0]}: {exc}") from None
    return ModelConfig(
        name=name,
        kind=kind,
        device=_device(prefix + "device", table.get("device", "auto")),
        dtype=_choice(prefix + "dtype", table.get("dtype", "float32"), DTYPES),
        instances=_integer(prefix + "instances", table.get("instances", 0), 0, 64),
        threads=_integer(prefix + "threads", table.get("threads", 0), 0, 1024),
        weights=weights_path,
        seed=_integer(prefix + "seed", table.get("seed", 0), 0),
        batching=batching,
        lrn=lrn,
    )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def load_settings(
    config: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> ServerSettings:
    """Settings from defaults < ``config`` (TOML) < ``env`` (LRNSERVE_*) < ``overrides`` (flags)."""
    env = env or {}
    settings = ServerSettings()
    if config is None and env.get(ENV_PREFIX + "CONFIG"):
        config = Path(env[ENV_PREFIX + "CONFIG"])
    if config is not None:
        document = _read_toml(config)
        _reject_unknown("", document, ("server", "models"))
        server = _table("server", document.get("server", {}))
        _reject_unknown("server.", server, tuple(_SERVER_KEYS))
        base_dir = config.resolve().parent
        values = {
            key: _SERVER_KEYS[key](
                f"server.{key}", str(base_dir / value) if key in _PATH_KEYS and isinstance(value, str) else value
            )
            for key, value in server.items()
        }
        settings = replace(settings, **values)
        if "models" in document:
            models = _table("models", document["models"])
            if not models:
                raise ConfigError("models: the table names no models")
            base_dir = config.resolve().parent
            settings = replace(
                settings,
                models=tuple(_model(name, _table(f"models.{name}", t), base_dir) for name, t in models.items()),
            )
    for key, check in _SERVER_KEYS.items():
        variable = ENV_PREFIX + key.upper()
        if env.get(variable, "") != "":
            settings = replace(settings, **{key: check(variable, env[variable])})
    for key, value in (overrides or {}).items():
        if value is not None:
            settings = replace(settings, **{key: _SERVER_KEYS[key](f"--{key.replace('_', '-')}", value)})
    if env.get(ENV_PREFIX + "TOKEN", "") != "":
        token = env[ENV_PREFIX + "TOKEN"].strip()
        if not token:
            raise ConfigError("LRNSERVE_TOKEN: only whitespace; unset it, or give the token")
        settings = replace(settings, token=Secret(token))
    return check_security(settings)


def check_security(settings: ServerSettings) -> ServerSettings:
    """TLS files come in usable combinations; plaintext only when asked; the token is read."""
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("tls_cert/tls_key: give both the certificate chain and its key, or neither")
    if settings.tls_cert is None:
        if settings.tls_client_ca is not None:
            raise ConfigError("tls_client_ca: client certificates need TLS; set tls_cert and tls_key too")
        if settings.metrics_tls:
            raise ConfigError("metrics_tls: needs tls_cert and tls_key")
        if not settings.plaintext:
            raise ConfigError(
                "plaintext: no TLS certificate is configured (tls_cert/tls_key, --tls-cert/--tls-key); "
                "to serve without TLS say so with --plaintext, LRNSERVE_PLAINTEXT=1 or plaintext = true"
            )
    if settings.token_file is not None:
        token = settings.token_file.read_text().strip()
        if not token:
            raise ConfigError(f"token_file: {settings.token_file} is empty")
        settings = replace(settings, token=Secret(token))
    return settings
