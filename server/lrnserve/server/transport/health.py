"""The standard grpc.health.v1 service: overall status ("") and one entry per model.

Readiness probes ask ``""``: NOT_SERVING while models load and while draining.
Liveness probes ask ``liveness``: SERVING from the moment the port opens until the
process exits, so that neither a slow model load nor a drain gets the pod killed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from lrnserve.client.pb import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


LIVENESS = "liveness"


class HealthService(health_pb2_grpc.HealthServicer):
    """Statuses start NOT_SERVING (``liveness``: SERVING); the server flips them as models
    load and on drain."""

    def __init__(self, services: list[str]) -> None:
        self._status = dict.fromkeys(["", *services], NOT_SERVING)
        self._status[LIVENESS] = SERVING
        self._changed = asyncio.Condition()
        self._closed = False

    async def close(self) -> None:
        """Everything NOT_SERVING, and Watch streams end so that shutdown need not wait for them."""
        async with self._changed:
            self._closed = True
            for service in self._status:
                if service != LIVENESS:
                    self._status[service] = NOT_SERVING
            self._changed.notify_all()

    async def set(self, service: str, serving: bool) -> None:
        async with self._changed:
            self._status[service] = SERVING if serving else NOT_SERVING
            self._changed.notify_all()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service '{request.service}'")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            async with self._changed:
                current = self._status.get(request.service, SERVICE_UNKNOWN)
                if current == last:
                    if self._closed:
                        return
                    await self._changed.wait()
                    continue
            last = current
            yield health_pb2.HealthCheckResponse(status=current)
