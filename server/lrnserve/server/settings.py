"""Server settings: one typed object built from defaults, a TOML file, LRNSERVE_* and flags.

Every setting is declared once below, as a field with its checker and doc (``schema``); the
TOML key, the ``LRNSERVE_*`` variable, the ``serve`` flag, validation and the reference table
in docs/settings.md all come from that declaration (``python -m lrnserve.server.settings``
prints the table; a test keeps the committed one current).

Precedence (lowest to highest): built-in defaults, the TOML file, environment variables,
command-line flags. A file with a ``[models]`` table replaces the embedded default model
repository. Every problem is a ``ConfigError`` whose message names the offending key
(``models.alexnet.max_batch_size``), variable or flag.
"""

from __future__ import annotations

import hmac
import sys
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, replace
from pathlib import Path
from typing import Any

from lrnserve.client.allocator import DEFAULT_CACHE_BYTES
from lrnserve.client.protocol import DEFAULT_MAX_MESSAGE_BYTES

from .ops.params import ALPHA, BETA, Bound, K, LRNParams, check_mode, check_size
from .schema import (
    ENV_PREFIX,
    Boolean,
    Check,
    Choice,
    ConfigError,
    Device,
    Directory,
    File,
    FileOrNumbers,
    Integer,
    Names,
    Number,
    Setting,
    Text,
    model_setting,
    setting,
    settings_of,
)

BUILT_IN_NETWORKS = ("alexnet", "caffenet", "googlenet", "cifar10_full", "zfnet512")
KINDS = ("lrn", *BUILT_IN_NETWORKS, "caffe", "onnx")
# The kinds each restricted model setting applies to (``Setting.only`` names a group).
MODEL_GROUPS: dict[str, tuple[str, ...]] = {
    "lrn": ("lrn",),
    "network": (*BUILT_IN_NETWORKS, "caffe", "onnx"),
    "weighted": (*BUILT_IN_NETWORKS, "caffe"),
    "caffe": ("caffe",),
    "onnx": ("onnx",),
}
_GROUP_NAMES = {
    "lrn": "lrn",
    "network": "networks",
    "weighted": "built-in networks, caffe",
    "caffe": "caffe",
    "onnx": "onnx",
}
DTYPES = ("float32", "float16", "bfloat16", "float64")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


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


class _Token(Check):
    text = "string (the token itself)"

    def __call__(self, key: str, value: object) -> Secret:
        token = str(value).strip()
        if not token:
            raise ConfigError(f"{key}: only whitespace; unset it, or give the token")
        return Secret(token)


class _LRNRule(Check):
    """A model's default for an LRN request parameter, checked by the op's own rule."""

    def __init__(self, rule: Callable[[object], object], text: str) -> None:
        self.rule, self.text = rule, text

    def __call__(self, key: str, value: object) -> object:
        try:
            return self.rule(value)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None


def _bound(bound: Bound) -> _LRNRule:
    return _LRNRule(bound.check, bound.text)


_LRN = LRNParams()


def _lrn_default(name: str, check: Check, doc: str) -> Setting:
    """A [models.NAME] key of an LRN model: the default of one request parameter (ops.LRNParams)."""
    return Setting(name, getattr(_LRN, name), check, doc, only="lrn", env=False, flags=())


LRN_SETTINGS = {
    s.name: s
    for s in (
        _lrn_default("mode", _LRNRule(check_mode, "across | within"), "default LRN region"),
        _lrn_default("size", _LRNRule(check_size, "integer >= 1"), "default window length"),
        _lrn_default("alpha", _bound(ALPHA), "default alpha (divided by the window's element count)"),
        _lrn_default("beta", _bound(BETA), "default beta (the exponent)"),
        _lrn_default("k", _bound(K), "default k (added before the power)"),
    )
}


@dataclass(frozen=True)
class BatchingPolicy:
    max_batch_size: int = model_setting(32, Integer(1), "samples per batch")
    max_queue_delay_us: int = model_setting(
        2000,
        Integer(0),
        "how long the oldest request may wait for a fuller batch; spent only while more requests are "
        "expected, so a lone caller never waits; 0: never wait",
    )
    max_queue_size: int = model_setting(256, Integer(1), "queued requests before RESOURCE_EXHAUSTED")
    max_request_samples: int = model_setting(1024, Integer(1), "samples (N) one request may carry")


@dataclass(frozen=True)
class Preprocess:
    """``[models.NAME.preprocess]``: Caffe's ``Transformer.preprocess``, done by the server in each
    batch on the model's device (``preprocess.Preprocessor``), in Caffe's order: cast to float,
    HWC -> CHW (``layout``), RGB -> BGR (``channel_order``), x ``raw_scale``, - ``mean``, x ``scale``.
    The client then sends what ``input_datatype`` and ``layout`` say (ModelMetadata reports it)."""

    input_datatype: str = model_setting(
        "fp32", Choice("fp32", "uint8"), "uint8: accept UINT8 images too (float inputs are always accepted)"
    )
    layout: str = model_setting("nchw", Choice("nchw", "nhwc"), "the layout the client sends; nhwc: [N, H, W, C]")
    channel_order: str = model_setting(
        "bgr", Choice("bgr", "rgb"), "the channel order the client sends; rgb: swapped to the model's BGR"
    )
    raw_scale: float = model_setting(1.0, Number(0.0), "multiplies the input before the mean (255 for 0-1 images)")
    mean: Path | tuple[float, ...] | None = model_setting(
        None,
        FileOrNumbers(),
        "subtracted: a .binaryproto mean image, or one value per channel, in the model's channel order",
    )
    scale: float = model_setting(1.0, Number(0.0), "multiplies the input after the mean (Caffe's input scale)")
    crop: str = model_setting(
        "center", Choice("center", "none"), "center: a larger mean image is centre-cropped to the input, as Caffe's"
    )


@dataclass(frozen=True)
class ModelConfig:
    name: str
    kind: str = model_setting(MISSING, Choice(*KINDS), "what the model is (default: the table's name)")
    device: str = model_setting("auto", Device(), "overrides the server's device for this model")
    dtype: str = model_setting("float32", Choice(*DTYPES), "compute dtype of a network", only="network")
    allow_tf32: bool = model_setting(
        False,
        Boolean(),
        "on CUDA, let a float32 network's convolutions and matrix products round to TF32 (faster, not "
        "float32-exact; torch's switch is process-wide)",
        only="network",
    )
    instances: int = model_setting(
        0,
        Integer(0, 64),
        "concurrent batches (worker threads / CUDA streams); 0: on CUDA 2, networks on the CPU min(cores, 4), else 1",
    )
    threads: int = model_setting(
        0, Integer(0, 1024), "CPU intra-op threads per instance; 0: the cores shared out among the instances"
    )
    weights: Path | None = model_setting(
        None,
        File(),
        "trained weights: a caffe model's .caffemodel; a built-in network's .caffemodel (layers matched by "
        "Caffe name), state dict or .safetensors; absent: seeded random weights",
        only="weighted",
    )
    seed: int = model_setting(
        0, Integer(0), "seed of the random weights used when `weights` is absent", only="weighted"
    )
    prototxt: Path | None = model_setting(
        None, File(), "the Caffe net definition (deploy.prototxt); required", only="caffe"
    )
    path: Path | None = model_setting(None, File(), "the .onnx model file; required", only="onnx")
    labels: Path | None = model_setting(
        None,
        File(),
        "class labels, one a line (as many as the output's classes): the classification extension's "
        "`score:index:label` and ModelConfig's label_filename",
        only="network",
    )
    batching: BatchingPolicy = field(default_factory=BatchingPolicy)
    lrn: LRNParams = field(default_factory=LRNParams)
    preprocess: Preprocess | None = None  # [models.NAME.preprocess]; None: the client's


@dataclass(frozen=True)
class ServerSettings:
    host: str = setting("0.0.0.0", Text(), "address to bind")
    grpc_port: int = setting(8001, Integer(0, 65535), "gRPC port; 0 picks a free port")
    metrics_port: int = setting(8002, Integer(0, 65535), "Prometheus metrics port; 0 picks a free port")
    metrics_enabled: bool = setting(
        True, Boolean(), "export Prometheus metrics", flags=("--no-metrics",), flag_sets=False
    )
    device: str = setting("auto", Device(), "where models run; auto: CUDA when available")
    grace_seconds: float = setting(
        30.0, Number(0.0), "drain time on SIGTERM/SIGINT", flags=("--grace-seconds", "--grace")
    )
    log_level: str = setting("info", Choice(*LOG_LEVELS), "log level")
    max_message_bytes: int = setting(
        DEFAULT_MAX_MESSAGE_BYTES, Integer(1024, 2**31 - 1), "largest gRPC message either way"
    )
    max_tensor_bytes: int = setting(DEFAULT_MAX_MESSAGE_BYTES, Integer(1), "largest input tensor")
    max_tensor_elements: int = setting(64 * 1024 * 1024, Integer(1), "most elements of one input tensor")
    max_inflight_bytes: int = setting(
        2 * 1024 * 1024 * 1024,
        Integer(1),
        "bytes held for requests in flight: each one's message from receipt and three times its output, "
        "until its answer is sent; beyond it RESOURCE_EXHAUSTED",
    )
    max_concurrent_rpcs: int = setting(128, Integer(1, 1_000_000), "calls served at once; beyond it RESOURCE_EXHAUSTED")
    max_concurrent_receives: int = setting(
        8,
        Integer(1, 1_000_000),
        "ModelInfer messages received at once (each holds up to twice max_message_bytes while it arrives); "
        "other calls wait, flow control holding their bytes back",
    )
    max_stream_inflight: int = setting(
        64,
        Integer(1, 65536),
        "requests one ModelStreamInfer stream may have in flight; its next message is read once one is answered",
    )
    allow_shared_memory: bool = setting(
        False,
        Boolean(),
        "serve Triton's system shared memory extension: same-host clients pass tensors in regions under "
        "/dev/shm (Triton's --allow-client-shm)",
        flags=("--allow-shared-memory",),
        flag_sets=True,
    )
    max_open_streams: int = setting(
        16,
        Integer(1, 1_000_000),
        "ModelStreamInfer streams open at once (each receives one message at a time, outside the receive "
        "slots); beyond it RESOURCE_EXHAUSTED",
    )
    receive_timeout_seconds: float = setting(
        30.0,
        Number(0.001),
        "a ModelInfer message must arrive within this once its receipt began; else DEADLINE_EXCEEDED",
    )
    idle_trim_seconds: float = setting(
        1.0, Number(0.0), "give freed heap memory back to the kernel once no call was in progress this long; 0: never"
    )
    allocator_cache_bytes: int = setting(
        DEFAULT_CACHE_BYTES, Integer(0, 2**62), "freed memory the C heap may keep for reuse; 0: glibc's default"
    )
    allocator_arenas: int = setting(
        1,
        Integer(0, 1024),
        "C heaps the server's threads share (glibc's M_ARENA_MAX): the idle trim gives back all of one "
        "heap, but not the top of other threads' heaps; 0: glibc's default, 8 per core",
    )
    tls_cert: Path | None = setting(None, File(), "serve gRPC over TLS with this certificate chain...")
    tls_key: Path | None = setting(None, File(), "...and this private key")
    tls_client_ca: Path | None = setting(None, File(), "require client certificates from this CA (mutual TLS)")
    metrics_tls: bool = setting(False, Boolean(), "serve /metrics over HTTPS with the same certificate", flag_sets=True)
    plaintext: bool = setting(
        False, Boolean(), "serve without TLS; required when no certificate is set", flag_sets=True
    )
    token_file: Path | None = setting(
        None, File(), 'require "authorization: Bearer <token>" on every RPC but health, the token read from this file'
    )
    token: Secret | None = setting(None, _Token(), "the token itself, instead of token_file", toml=False, flags=())
    model_control_token_file: Path | None = setting(
        None,
        File(),
        "require this second token (read from the file) for RepositoryIndex/Load/Unload; inference callers' "
        "token is then refused for them (PERMISSION_DENIED)",
    )
    model_control_token: Secret | None = setting(
        None, _Token(), "the model-control token itself, instead of model_control_token_file", toml=False, flags=()
    )
    model_repository: Path | None = setting(
        None,
        Directory(),
        "serve the models of this folder (README, Model repository) instead of [models] or the embedded ones",
    )
    model_control_mode: str = setting(
        "none",
        Choice("none", "explicit", "poll"),
        "none: load every model at start; explicit: only --load-model and RepositoryModelLoad; "
        "poll: also load, reload and unload as the folder changes",
    )
    load_model: tuple[str, ...] = setting(
        (), Names(), "in explicit mode, a model to load at start (repeatable; comma-separated in the variable)"
    )
    strict_model_config: bool = setting(
        False, Boolean(), "in mode none, fail start-up when a model of the repository fails to load", flag_sets=True
    )
    repository_poll_secs: float = setting(15.0, Number(0.01), "in poll mode, seconds between scans of the folder")
    models: tuple[ModelConfig, ...] = field(default_factory=lambda: default_models())


SERVER_SETTINGS = settings_of(ServerSettings)
MODEL_SETTINGS = {**settings_of(ModelConfig), **settings_of(BatchingPolicy), **LRN_SETTINGS}
PREPROCESS_SETTINGS = settings_of(Preprocess)
_REQUIRED_FILE = {"caffe": "prototxt", "onnx": "path"}


def model_from_table(name: str, table: Mapping[str, Any], base_dir: Path) -> ModelConfig:
    """One model from the keys of a ``[models.NAME]`` table (a repository's config.toml too),
    relative paths resolved against ``base_dir``."""
    return _model(name, table, base_dir)


def default_models() -> tuple[ModelConfig, ...]:
    """The embedded model repository served when no config names models."""
    return tuple(ModelConfig(name=kind, kind=kind) for kind in ("lrn", *BUILT_IN_NETWORKS))


def _reject_unknown(prefix: str, table: Mapping[str, object], known: Iterable[str]) -> None:
    known = tuple(known)
    for key in table:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key; expected one of {', '.join(known)}")


def _table(key: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table, got {value!r}")
    return value


def _checked(declared: Setting, key: str, value: object, base: Path | None) -> Any:
    if isinstance(declared.check, (File, Directory)):
        return declared.check(key, value, base)
    return declared.check(key, value)


def _model(name: str, table: Mapping[str, Any], base_dir: Path) -> ModelConfig:
    prefix = f"models.{name}."
    _reject_unknown(prefix, table, (*MODEL_SETTINGS, "preprocess"))
    table = dict(table)
    preprocess = table.pop("preprocess", None)
    kind = MODEL_SETTINGS["kind"].check(prefix + "kind", table.get("kind", name))
    for key in table:
        only = MODEL_SETTINGS[key].only
        if only is not None and kind not in MODEL_GROUPS[only]:
            raise ConfigError(f"{prefix}{key}: not a setting of a {kind!r} model")
    required = _REQUIRED_FILE.get(kind)
    if required is not None and required not in table:
        raise ConfigError(f"{prefix}{required}: a {kind!r} model needs its file")
    values = {key: _checked(MODEL_SETTINGS[key], prefix + key, value, base_dir) for key, value in table.items()}
    values["kind"] = kind
    batching = BatchingPolicy(**{k: v for k, v in values.items() if k in settings_of(BatchingPolicy)})
    lrn = LRNParams(**{k: v for k, v in values.items() if k in LRN_SETTINGS})
    own = {k: v for k, v in values.items() if k in settings_of(ModelConfig)}
    if preprocess is not None:
        own["preprocess"] = _preprocess(prefix + "preprocess", preprocess, kind, base_dir)
    return ModelConfig(name=name, batching=batching, lrn=lrn, **own)


def _preprocess(key: str, value: object, kind: str, base_dir: Path) -> Preprocess:
    """A model's ``preprocess`` table (networks only), each key checked under ``models.NAME.preprocess.KEY``."""
    if kind not in MODEL_GROUPS["network"]:
        raise ConfigError(f"{key}: not a setting of a {kind!r} model")
    table = _table(key, value)
    _reject_unknown(key + ".", table, PREPROCESS_SETTINGS)
    return Preprocess(**{k: _checked(PREPROCESS_SETTINGS[k], f"{key}.{k}", v, base_dir) for k, v in table.items()})


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
    """Settings from defaults < ``config`` (TOML) < ``env`` (LRNSERVE_*) < ``overrides`` (flags,
    by setting name; None means not given)."""
    env = env or {}
    settings = ServerSettings()
    if config is None and env.get(ENV_PREFIX + "CONFIG"):
        config = Path(env[ENV_PREFIX + "CONFIG"])
    if config is not None:
        document = _read_toml(config)
        _reject_unknown("", document, ("server", "models"))
        server = _table("server", document.get("server", {}))
        _reject_unknown("server.", server, (name for name, s in SERVER_SETTINGS.items() if s.toml))
        base_dir = config.resolve().parent
        values = {
            key: _checked(SERVER_SETTINGS[key], f"server.{key}", value, base_dir) for key, value in server.items()
        }
        settings = replace(settings, **values)
        if "models" in document:
            models = _table("models", document["models"])
            if not models:
                raise ConfigError("models: the table names no models")
            settings = replace(
                settings,
                models=tuple(_model(name, _table(f"models.{name}", t), base_dir) for name, t in models.items()),
            )
    for key, declared in SERVER_SETTINGS.items():
        if declared.env and env.get(declared.variable, "") != "":
            settings = replace(settings, **{key: _checked(declared, declared.variable, env[declared.variable], None)})
    for key, value in (overrides or {}).items():
        if value is not None:
            declared = SERVER_SETTINGS[key]
            settings = replace(settings, **{key: _checked(declared, declared.flag_names[0], value, None)})
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
        settings = replace(settings, token=_file_token("token_file", settings.token_file))
    if settings.model_control_token_file is not None:
        token = _file_token("model_control_token_file", settings.model_control_token_file)
        settings = replace(settings, model_control_token=token)
    return settings


def _file_token(key: str, path: Path) -> Secret:
    token = path.read_text().strip()
    if not token:
        raise ConfigError(f"{key}: {path} is empty")
    return Secret(token)


def _cell(value: object) -> str:
    if value is MISSING:
        return "—"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def reference() -> str:
    """The reference table of every setting (docs/settings.md), made from the declarations."""
    lines = [
        "# Settings reference",
        "",
        "Generated from the declarations in `server/lrnserve/server/settings.py` by",
        "`python -m lrnserve.server.settings > docs/settings.md`; a test fails when this file is stale.",
        "Precedence: flags > `LRNSERVE_*` variables > the TOML file (`--config`, `LRNSERVE_CONFIG`) > defaults.",
        "",
        "## `[server]`",
        "",
        "| key | variable | flag | default | accepts | what it does |",
        "|---|---|---|---|---|---|",
    ]
    for s in SERVER_SETTINGS.values():
        key = f"`{s.name}`" if s.toml else "(none)"
        variable = f"`{s.variable}`" if s.env else ""
        flags = ", ".join(f"`{f}`" for f in s.flag_names)
        lines.append(f"| {key} | {variable} | {flags} | {_cell(s.default)} | {_escape(s.check.text)} | {s.doc} |")
    lines += [
        "",
        "## `[models.NAME]`",
        "",
        "The table's name is the served model's name. These keys exist only in the file;",
        "`preprocess.KEY` is `KEY` of the model's `[models.NAME.preprocess]` table (see the README's",
        "Preprocessing: cast, HWC -> CHW, RGB -> BGR, x raw_scale, - mean, x scale, in Caffe's order).",
        "",
        "| key | models | default | accepts | what it does |",
        "|---|---|---|---|---|",
    ]
    for s in MODEL_SETTINGS.values():
        models = _GROUP_NAMES.get(s.only or "", "all")
        lines.append(f"| `{s.name}` | {models} | {_cell(s.default)} | {_escape(s.check.text)} | {s.doc} |")
    for s in PREPROCESS_SETTINGS.values():  # the [models.NAME.preprocess] table
        models = _GROUP_NAMES["network"]
        lines.append(f"| `preprocess.{s.name}` | {models} | {_cell(s.default)} | {_escape(s.check.text)} | {s.doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference())
