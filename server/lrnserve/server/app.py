"""Assembles the service from settings and runs its lifecycle.

start: bind the gRPC port (live, not ready), load every model, then report
SERVING. drain (SIGTERM/SIGINT): health NOT_SERVING, new requests UNAVAILABLE,
queued and running requests finish within the grace period, then the port
closes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from lrnserve.client.pb import grpc_predict_v2_pb2 as pb
from lrnserve.client.pb import health_pb2, health_pb2_grpc

from .control import ModelControl
from .dataplane import EXTENSIONS, DataPlane
from .memory import IdleTrimmer
from .metrics import Metrics
from .repository import ModelRepository, ServableFactory, resolve_devices
from .servables import create_servable
from .settings import ServerSettings, check_security
from .shared_memory import SharedMemory
from .telemetry import Telemetry
from .transport.auth import TokenAuth
from .transport.calls import CallTracker
from .transport.health import HealthService
from .transport.receiving import ReceiveSlots
from .transport.service import Guarded, InferenceService, quiet_departures
from .transport.wire import add_inference_service

logger = logging.getLogger(__name__)

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def grpc_options(settings: ServerSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
        # Keep idle client connections healthy through load balancers, and let clients ping.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Slow or stalled clients: a connection must finish its handshake in 10 s, idle
        # connections close after 15 minutes, and one connection holds at most 256 streams.
        ("grpc.server_handshake_timeout_ms", 10_000),
        ("grpc.max_connection_idle_ms", 15 * 60_000),
        ("grpc.max_concurrent_streams", 256),
    ]


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS (mutual when a client CA is set) from the configured files; None for plaintext."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class LrnServer:
    """One server process: gRPC inference + health + reflection over a model repository.

    Built bottom-up, each part handed to the one above it: telemetry, the repository (models
    made by ``servables``), the data plane, then the transport in ``start``.
    """

    def __init__(
        self,
        settings: ServerSettings,
        registry: CollectorRegistry | None = None,
        servables: ServableFactory = create_servable,
    ) -> None:
        # The same rules as for loaded settings, also for ones built in code: TLS or plaintext
        # explicitly, usable TLS file combinations, the token read.
        settings = check_security(settings)
        self.settings = settings
        # A model repository replaces the configured models: model control loads its folders.
        configured = settings.models if settings.model_repository is None else ()
        devices = resolve_devices(configured, settings.device)
        names = [m.name for m in configured]
        self.registry = registry or CollectorRegistry()
        metrics = None
        if settings.metrics_enabled:
            metrics = Metrics(
                self.registry,
                models=devices,
                queue_capacity={m.name: m.batching.max_queue_size for m in configured},
                max_batch_size=max((m.batching.max_batch_size for m in settings.models), default=32),
            )
        self.telemetry = Telemetry(names, metrics)
        self.repository = ModelRepository(configured, devices, self.telemetry, servables, settings.device)
        self.health = HealthService([INFERENCE_SERVICE, *names])
        self.control = ModelControl(self.repository, self.telemetry, settings, self.health.set)
        shared = SharedMemory(settings.allow_shared_memory)
        extensions = EXTENSIONS + (("system_shared_memory",) if settings.allow_shared_memory else ())
        self.dataplane = DataPlane(
            self.repository, self.telemetry, settings, extensions, control=self.control, shared_memory=shared
        )
        self.trimmer = IdleTrimmer(settings.idle_trim_seconds)
        self.grpc_port = 0
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._calls: CallTracker | None = None
        self.receive_slots: ReceiveSlots | None = None
        self.inference: InferenceService | None = None
        self._calls_count = 0
        self._metrics_http: tuple[WSGIServer, threading.Thread] | None = None
        self._stopped = asyncio.Event()
        self.drained = True

    def _calls_changed(self, count: int) -> None:
        self._calls_count = count
        self.telemetry.calls_in_progress(count)
        self._busy_changed()

    def _busy_changed(self) -> None:
        """The idle trim waits for no call at work: an open stream with no request in flight is idle."""
        streams = self.inference.streams if self.inference is not None else None
        busy = self._calls_count - (streams.open - streams.active if streams is not None else 0)
        self.trimmer.calls(max(0, busy))

    @property
    def address(self) -> str:
        host = self.settings.host
        return f"{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{self.grpc_port}"

    async def start(self) -> None:
        """Listen, then load every model; returns once all are ready (raises if one fails)."""
        interceptors = []
        token, control = self.settings.token, self.settings.model_control_token
        if token is not None or control is not None:
            interceptors.append(
                TokenAuth(
                    token.reveal() if token is not None else None,
                    self.telemetry.auth_rejected,
                    control.reveal() if control is not None else None,
                )
            )
        quiet_departures()
        server = grpc.aio.server(
            interceptors=interceptors,
            options=grpc_options(self.settings),
            # Calls waiting for a receive slot hold their stream's flow-control window each:
            # this caps that part of the memory (README, "Memory").
            maximum_concurrent_rpcs=self.settings.max_concurrent_rpcs,
        )
        slots = ReceiveSlots(self.settings.max_concurrent_receives, self.settings.receive_timeout_seconds)
        self.receive_slots = slots
        self.inference = InferenceService(
            self.dataplane, self.settings.max_stream_inflight, self.settings.max_open_streams, self._busy_changed
        )
        self._calls = add_inference_service(
            server, Guarded(self.inference), self.dataplane.budget, slots, self._calls_changed
        )
        health_pb2_grpc.add_HealthServicer_to_server(Guarded(self.health), server)  # type: ignore[arg-type]
        reflection.enable_server_reflection((INFERENCE_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
        bind = f"{self.settings.host}:{self.settings.grpc_port}"
        credentials = server_credentials(self.settings)
        if credentials is None:
            self.grpc_port = server.add_insecure_port(bind)
        else:
            self.grpc_port = server.add_secure_port(bind, credentials)
        if self.grpc_port == 0:
            raise OSError(f"could not bind gRPC port {bind}")
        await server.start()
        self._server = server
        security = "plaintext" if credentials is None else ("mutual TLS" if self.settings.tls_client_ca else "TLS")
        auth = ", bearer token required" if self.settings.token is not None else ""
        logger.info(
            "gRPC listening on %s:%d (%s%s; live; loading models)", self.settings.host, self.grpc_port, security, auth
        )
        start = time.perf_counter()
        try:
            self._start_metrics()
            await self.repository.load_all()
            await self.control.start()
        except BaseException:
            await self.stop(grace=0)
            raise
        if self.dataplane.draining:  # SIGTERM arrived while models loaded: stay NOT_SERVING
            return
        for name in self.repository.names():
            await self.health.set(name, any(m.ready for m in self.repository.models() if m.name == name))
        await self.health.set(INFERENCE_SERVICE, True)
        await self.health.set("", True)
        logger.info("ready: %d models in %.1fs", len(self.repository.names()), time.perf_counter() - start)

    def _start_metrics(self) -> None:
        if self.telemetry.metrics is None:
            return
        tls = self.settings.metrics_tls
        self._metrics_http = start_http_server(
            self.settings.metrics_port,
            self.settings.host,
            self.registry,
            certfile=str(self.settings.tls_cert) if tls else None,
            keyfile=str(self.settings.tls_key) if tls else None,
        )
        self.metrics_port = int(self._metrics_http[0].server_port)
        scheme = "https" if tls else "http"
        logger.info("metrics on %s://%s:%d/metrics", scheme, self.settings.host, self.metrics_port)

    async def stop(self, grace: float | None = None) -> bool:
        """Drain and stop; True when every call begun before the drain finished in time.

        Health goes NOT_SERVING and new calls are refused with UNAVAILABLE at once; every call
        already begun (computing, queued, or with its message still arriving) is served; the
        port closes when they are done or ``grace`` seconds have passed."""
        if self._stopped.is_set():
            return True
        grace = self.settings.grace_seconds if grace is None else grace
        deadline = time.monotonic() + grace
        self.dataplane.begin_drain()
        if self.inference is not None:
            self.inference.streams.stop_reading()  # open streams answer what they hold, then end
        await self.health.close()
        drained = True
        await self.control.stop()
        if self._calls is not None:
            drained = await self._calls.wait_finished(self.dataplane.drain_started, grace)
        self.repository.close()
        drained = await self.repository.drain(max(0.0, deadline - time.monotonic())) and drained
        if not drained:
            logger.warning("grace period of %.1fs ended with requests still queued or running", grace)
        # Requests still queued now fail with UNAVAILABLE ("never ran: retry elsewhere") from
        # their batcher, before the port closes and gRPC cancels whatever is left.
        await self.repository.stop(timeout=max(0.0, deadline - time.monotonic()))
        await asyncio.sleep(0)  # let those requests' handlers send their status
        if self._server is not None:
            # In-flight RPCs have their answers; give them the rest of the grace to be sent.
            await self._server.stop(max(0.0, deadline - time.monotonic()))
        if self._metrics_http is not None:
            http, thread = self._metrics_http
            http.shutdown()
            http.server_close()
            thread.join(timeout=5)
        self.drained = drained
        self._stopped.set()
        logger.info("stopped (%s)", "drained" if drained else "grace period exceeded")
        return drained

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
