"""Configuration: TOML, LRNSERVE_* variables and flags, with errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lrnserve.server.ops import LRNParams
from lrnserve.server.repository import resolve_device
from lrnserve.server.settings import BUILT_IN_NETWORKS, BatchingPolicy, ConfigError, ServerSettings, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lrnserve.toml"
    path.write_text(text)
    return path


def test_defaults_serve_the_embedded_models() -> None:
    settings = load_settings(overrides={"plaintext": True})
    assert settings == ServerSettings(plaintext=True)
    assert [m.name for m in settings.models] == ["lrn", *BUILT_IN_NETWORKS]
    assert (settings.grpc_port, settings.metrics_port, settings.device) == (8001, 8002, "auto")
    assert settings.max_message_bytes >= 256 * 1024 * 1024
    assert all(m.batching == BatchingPolicy() and m.batching.max_batch_size == 32 for m in settings.models)


def test_file_env_and_flags_in_order_of_precedence(tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    path = write(
        tmp_path,
        """
        [server]
        plaintext = true
        grpc_port = 9001
        metrics_port = 9002
        grace_seconds = 12.5
        log_level = "DEBUG"

        [models.fast_lrn]
        kind = "lrn"
        mode = "within"
        size = 3
        alpha = 5e-5
        max_batch_size = 64
        max_queue_delay_us = 0
        max_queue_size = 10
        instances = 2

        [models.alexnet]
        weights = "w.pt"
        dtype = "bfloat16"
        device = "cpu"
        """,
    )
    settings = load_settings(
        path,
        env={"LRNSERVE_METRICS_PORT": "9102", "LRNSERVE_GRACE_SECONDS": "3"},
        overrides={"grace_seconds": 7},
    )
    assert (settings.grpc_port, settings.metrics_port, settings.grace_seconds, settings.log_level) == (
        9001,
        9102,
        7.0,
        "debug",
    )
    lrn, alexnet = settings.models
    assert (lrn.name, lrn.kind, lrn.instances) == ("fast_lrn", "lrn", 2)
    assert lrn.lrn == LRNParams(3, 5e-5, 0.75, 1.0, "within")
    assert lrn.batching == BatchingPolicy(64, 0, 10)
    assert (alexnet.kind, alexnet.dtype, alexnet.device, alexnet.weights) == (
        "alexnet",
        "bfloat16",
        "cpu",
        weights,
    )


def test_config_path_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\ngrpc_port = 1234\n")
    assert load_settings(env={"LRNSERVE_CONFIG": str(path), "LRNSERVE_PLAINTEXT": "1"}).grpc_port == 1234


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\ngrpc_prot = 1\n", "server.grpc_prot: unknown key"),
        ("[server]\ngrpc_port = 70000\n", "server.grpc_port: expected an integer >= 0 and <= 65535"),
        ("[server]\ngrpc_port = 'x'\n", "server.grpc_port: expected an integer"),
        ("[server]\ndevice = 'tpu'\n", "server.device: expected auto, cpu, cuda or cuda:N"),
        ("[server]\nlog_level = 'loud'\n", "server.log_level: expected one of"),
        ("[server]\ngrace_seconds = -1\n", "server.grace_seconds: expected a number >= 0"),
        ("[server]\nallocator_cache_bytes = -1\n", "server.allocator_cache_bytes: expected an integer >= 0"),
        ("[serve]\n", "serve: unknown key"),
        ("[models]\n", "models: the table names no models"),
        ("[models.lrn]\nmax_batch_size = 0\n", "models.lrn.max_batch_size: expected an integer >= 1"),
        (
            "[models.lrn]\nmax_queue_delay_us = -5\n",
            "models.lrn.max_queue_delay_us: expected an integer >= 0",
        ),
        ("[models.lrn]\nmax_queue_size = true\n", "models.lrn.max_queue_size: expected an integer"),
        ("[models.lrn]\ninstances = -1\n", "models.lrn.instances: expected an integer >= 0"),
        ("[models.lrn]\nthreads = -1\n", "models.lrn.threads: expected an integer >= 0"),
        ("[models.lrn]\nsize = 0\n", "models.lrn.size: size must be an integer >= 1"),
        ("[models.lrn]\nalpha = -1.0\n", "models.lrn.alpha: alpha must be a finite number >= 0"),
        ("[models.lrn]\nmode = 'spatial'\n", "models.lrn.mode: mode must be one of 'across', 'within'"),
        ("[models.lrn]\nweights = 'w.pt'\n", "models.lrn.weights: not a setting of a 'lrn' model"),
        ("[models.alexnet]\nalpha = 1.0\n", "models.alexnet.alpha: not a setting of a 'alexnet' model"),
        ("[models.alexnet]\nweights = 'missing.pt'\n", "models.alexnet.weights: file"),
        ("[models.alexnet]\ndtype = 'int8'\n", "models.alexnet.dtype: expected one of float32"),
        ("[models.vgg]\n", "models.vgg.kind: expected one of lrn, alexnet"),
        ("[models.my_net]\nkind = 'resnet'\n", "models.my_net.kind: expected one of"),
        ("[models.lrn]\nbatch = 3\n", "models.lrn.batch: unknown key"),
        ("[server\n", "invalid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(write(tmp_path, text))


def test_plaintext_only_when_asked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="plaintext: no TLS certificate is configured"):
        load_settings()
    cert, key, ca = (tmp_path / n for n in ("server.pem", "server.key", "ca.pem"))
    for f in (cert, key, ca):
        f.write_text("-----BEGIN X-----\n")
    tls = load_settings(overrides={"tls_cert": str(cert), "tls_key": str(key), "tls_client_ca": str(ca)})
    assert (tls.tls_cert, tls.tls_key, tls.tls_client_ca, tls.plaintext) == (cert, key, ca, False)
    path = write(tmp_path, "[server]\ntls_cert = 'server.pem'\ntls_key = 'server.key'\n")
    assert load_settings(path).tls_cert == cert  # relative to the config file
    with pytest.raises(ConfigError, match="tls_cert/tls_key: give both"):
        load_settings(overrides={"tls_cert": str(cert)})
    with pytest.raises(ConfigError, match="tls_client_ca: client certificates need TLS"):
        load_settings(overrides={"tls_client_ca": str(ca), "plaintext": True})
    with pytest.raises(ConfigError, match="metrics_tls: needs tls_cert"):
        load_settings(overrides={"metrics_tls": True, "plaintext": True})
    with pytest.raises(ConfigError, match=r"--tls-key: file .* does not exist"):
        load_settings(overrides={"tls_cert": str(cert), "tls_key": str(tmp_path / "absent.key")})


def test_token_is_a_secret(tmp_path: Path) -> None:
    settings = load_settings(env={"LRNSERVE_TOKEN": " s3cret \n", "LRNSERVE_PLAINTEXT": "true"})
    assert settings.token is not None and settings.token.reveal() == "s3cret"
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings)
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert load_settings(overrides={"token_file": str(token_file), "plaintext": True}).token.reveal() == "from-file"  # type: ignore[union-attr]
    token_file.write_text("\n")
    with pytest.raises(ConfigError, match=r"token_file: .* is empty"):
        load_settings(overrides={"token_file": str(token_file), "plaintext": True})
    with pytest.raises(ConfigError, match="LRNSERVE_TOKEN: only whitespace"):
        load_settings(env={"LRNSERVE_TOKEN": "   ", "LRNSERVE_PLAINTEXT": "1"})
    with pytest.raises(ConfigError, match=r"server\.tls_cert: expected a non-empty string, got 5"):
        load_settings(write(tmp_path, "[server]\ntls_cert = 5\n"))


def test_limits(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[server]\nplaintext = true\nmax_tensor_elements = 1000\nmax_inflight_bytes = 4096\n"
        "[models.lrn]\nmax_request_samples = 4\n",
    )
    settings = load_settings(path, env={"LRNSERVE_ALLOCATOR_CACHE_BYTES": "0"})
    assert (settings.max_tensor_elements, settings.max_inflight_bytes) == (1000, 4096)
    assert settings.allocator_cache_bytes == 0 and ServerSettings().allocator_cache_bytes == 256 * 2**20
    assert settings.models[0].batching.max_request_samples == 4
    with pytest.raises(ConfigError, match=r"models\.lrn\.max_request_samples: expected an integer >= 1"):
        load_settings(write(tmp_path, "[models.lrn]\nmax_request_samples = 0\n"))


def test_bad_environment_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="LRNSERVE_GRPC_PORT: expected an integer"):
        load_settings(env={"LRNSERVE_GRPC_PORT": "eighty"})
    with pytest.raises(ConfigError, match="--grace-seconds: expected a number >= 0"):
        load_settings(overrides={"grace_seconds": -2})


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.toml")


def test_device_resolution() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto", "auto").type == expected
    assert resolve_device("auto", "cpu").type == "cpu"
    assert resolve_device("cpu", "cuda").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device: 'cuda' requested but this torch build sees no CUDA"):
            resolve_device("cuda", "auto")
