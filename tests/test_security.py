"""TLS, mutual TLS and bearer tokens, against real servers with certificates made here."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from certs import Pki, make_pki
from harness import ServerThread, free_port, lrn_model, metric_value, settings, wait_ready

from lrnserve.client import TLS, Client, Unauthenticated, Unavailable
from lrnserve.client.pb import grpc_predict_v2_pb2 as pb
from lrnserve.client.pb import grpc_predict_v2_pb2_grpc as pb_grpc
from lrnserve.server.settings import Secret

X = np.ones((1, 2, 3, 3), np.float32)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_settings(pki: Pki, client_ca: bool = False, **extra: object) -> object:
    return replace(
        settings(lrn_model()),  # type: ignore[arg-type]
        plaintext=False,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca if client_ca else None,
        **extra,
    )


def test_tls(pki: Pki) -> None:
    with ServerThread(tls_settings(pki)) as running:  # type: ignore[arg-type]
        with Client(running.target, tls=TLS(ca=pki.ca), timeout=10) as client:
            np.testing.assert_array_equal(client.lrn(X).shape, X.shape)
            assert client.health()
        with Client(running.target, retries=0, timeout=5) as plaintext, pytest.raises(Unavailable):
            plaintext.live()
        with (
            Client(running.target, tls=TLS(ca=pki.other_ca), retries=0, timeout=5) as wrong,
            pytest.raises(Unavailable),
        ):
            wrong.live()
        # By name, as a client would reach a real host.
        with Client(f"localhost:{running.server.grpc_port}", tls=TLS(ca=pki.ca.read_bytes()), timeout=10) as client:
            assert client.live()


def test_mutual_tls(pki: Pki) -> None:
    with ServerThread(tls_settings(pki, client_ca=True)) as running:  # type: ignore[arg-type]
        mutual = TLS(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
        with Client(running.target, tls=mutual, timeout=10) as client:
            assert client.lrn(X).shape == X.shape
        with Client(running.target, tls=TLS(ca=pki.ca), retries=0, timeout=5) as anonymous, pytest.raises(Unavailable):
            anonymous.live()
        # The command line speaks mutual TLS too.
        result = subprocess.run(
            [sys.executable, "-m", "lrnserve.client.cli", "health", "--target", running.target,
             "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr


def test_metrics_over_https(pki: Pki) -> None:
    with ServerThread(tls_settings(pki, metrics_tls=True)) as running:  # type: ignore[arg-type]
        context = ssl.create_default_context(cafile=str(pki.ca))
        url = f"https://127.0.0.1:{running.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            assert b"lrnserve_requests_total" in response.read()
        with pytest.raises(OSError):  # plain HTTP gets no answer from the HTTPS endpoint
            urllib.request.urlopen(url.replace("https", "http"), timeout=10).read()


@pytest.fixture(scope="module")
def token_server() -> Iterator[ServerThread]:
    config = replace(settings(lrn_model()), token=Secret("correct horse battery staple"))
    with ServerThread(config) as running:
        yield running


def test_token_required_on_every_rpc_but_health(token_server: ServerThread) -> None:
    target = token_server.target
    with Client(target, token="correct horse battery staple", timeout=10) as client:
        assert client.lrn(X).shape == X.shape
        assert client.server_metadata().name == "lrnserve"
        assert client.statistics("lrn").success_count >= 1
    for token in (None, "wrong", "correct horse battery stapl", "correct horse battery staple!"):
        with Client(target, token=token, timeout=10) as client:
            assert client.health() and client.health("lrn")  # probes carry no token
            for call in (
                lambda c: c.lrn(X),
                lambda c: c.live(),
                lambda c: c.metadata("lrn"),
                lambda c: c.statistics("lrn"),
            ):
                with pytest.raises(Unauthenticated, match="bearer token"):
                    call(client)
    # Server reflection is not open either.
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(
                reflect.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
                )
            )
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        wrong = [("authorization", "Bearer nope")]
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), metadata=wrong, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    from harness import scrape

    assert (metric_value(scrape(token_server.server.metrics_port), "lrnserve_auth_failures_total") or 0) >= 17


def test_token_never_reaches_the_log(tmp_path: Path) -> None:
    secret = "tok-9f8e7d6c5b4a"
    token_file = tmp_path / "token"
    token_file.write_text(secret + "\n")
    config = tmp_path / "c.toml"
    config.write_text("[models.lrn]\n")
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lrnserve.client.cli", "serve", "--config", str(config), "--plaintext",
             "--host", "127.0.0.1", "--grpc-port", str(port), "--metrics-port", "0", "--log-level", "debug",
             "--token-file", str(token_file)],
            stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy(),
        )  # fmt: skip
        try:
            wait_ready(f"127.0.0.1:{port}", None, 120)
            with Client(f"127.0.0.1:{port}", token=secret, timeout=10) as good:
                good.lrn(X)
            with Client(f"127.0.0.1:{port}", token=secret[:-1], timeout=10) as bad, pytest.raises(Unauthenticated):
                bad.lrn(X)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
    text = log.read_text()
    assert "bearer token required" in text
    assert secret not in text and secret[:-1] not in text
