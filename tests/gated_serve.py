"""``lrnserve serve`` whose models are gated probes, driven over stdin and stdout.

Run as ``python tests/gated_serve.py <serve flags...>``. Every batch (of an LRN model, or of a
network, which then computes for real), when it enters compute, writes one line
``computing <fill values>`` (the first value of each of its samples) to stdout and then waits
for the gate. The gate starts closed; the line ``open`` on stdin opens
it for good. stdout carries only those lines: the server's logs, and anything else the process
prints, go to stderr.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import TextIO

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import GatedLRN

from lrnserve.server.cli import main
from lrnserve.server.servables import NetworkServable, Servable
from lrnserve.server.settings import ModelConfig
from lrnserve.server.work import Abandonment

GATE = threading.Event()  # shared by every probe; starts closed


def _private_stdout() -> TextIO:
    """The real stdout, for the probe's lines only; file descriptor 1 then points at stderr, so
    that nothing else (a library's print, a warning) can land between those lines."""
    sys.stdout.flush()
    probe_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return probe_out


PROBE_OUT = _private_stdout()
_write_lock = threading.Lock()


def say(line: str) -> None:
    with _write_lock:
        PROBE_OUT.write(line + "\n")
        PROBE_OUT.flush()


class StdinGated(GatedLRN):
    """A GatedLRN whose gate is the shared ``GATE`` (closed until stdin says ``open``), and which
    announces each batch on stdout before it waits."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.gate = GATE

    def _enter(self, group: object, first_values: list[float]) -> None:
        say("computing " + " ".join(repr(value) for value in first_values))
        super()._enter(group, first_values)


class StdinGatedNetwork(NetworkServable):
    """A network whose batches announce themselves and wait for ``GATE``, then compute for real."""

    def run(
        self,
        group: Hashable,
        x: torch.Tensor,
        scalars: Mapping[str, torch.Tensor],
        abandonment: Abandonment | None = None,
    ) -> torch.Tensor:
        say("computing " + " ".join(repr(float(sample.reshape(-1)[0])) for sample in x))
        assert GATE.wait(timeout=60), "test gate never opened"
        return super().run(group, x, scalars, abandonment)


def gated_servable(config: ModelConfig) -> Servable:
    return StdinGated(config) if config.kind == "lrn" else StdinGatedNetwork(config)


def _read_commands(stream: TextIO) -> None:
    for line in stream:
        if line.strip() == "open":
            GATE.set()


if __name__ == "__main__":
    threading.Thread(target=_read_commands, args=(sys.stdin,), name="stdin-gate", daemon=True).start()
    sys.exit(main(sys.argv[1:], prog="gated_serve", servables=gated_servable))
