"""The C heap setting `lrnserve serve` and `lrnserve bench` apply to their own process."""

from __future__ import annotations

import platform
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from harness import serve_process

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def run(code: str) -> str:
    """In a child: the setting changes a whole process, never the test runner's."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_glibc_accepts_the_setting_and_zero_leaves_it_alone() -> None:
    code = "from lrnserve.client.allocator import keep_freed_memory as k\nprint(k(256 << 20), k(1 << 40), k(0), k(-1))"
    assert run(code) == "True True False False"


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
@pytest.mark.parametrize(("setting", "line"), [(None, "C heap keeps up to 256 MiB"), ("0", None)])
def test_the_server_applies_it_at_start_unless_set_to_zero(tmp_path: Path, setting: str | None, line: str) -> None:
    config = tmp_path / "lrn.toml"
    config.write_text('[models.lrn]\nkind = "lrn"\n')
    env = {} if setting is None else {"LRNSERVE_ALLOCATOR_CACHE_BYTES": setting}
    with serve_process("--config", str(config), env=env) as (proc, _):
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    assert "ready: 1 models" in output
    assert ("C heap keeps up to" in output) == (line is not None)
    if line is not None:
        assert line in output
