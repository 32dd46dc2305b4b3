"""make gpu-check without a GPU: the wheel set it accepts and the commands it would run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from harness import repo_root


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", repo_root() / "bench" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


GOOD = (
    "grpcio-1.85.4-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
    "grpcio_reflection-1.81.1-py3-none-any.whl",
    "protobuf-6.33.6-cp39-abi3-manylinux2014_x86_64.whl",
    "pytest_timeout-2.4.0-py3-none-any.whl",
)


def wheels(folder: Path, names: tuple[str, ...]) -> Path:
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


def test_a_complete_wheel_set_for_python_3_12_on_x86_64_passes(gpu_check: ModuleType, tmp_path: Path) -> None:
    assert gpu_check.wheel_problems(wheels(tmp_path / "w", GOOD)) == []


@pytest.mark.parametrize(
    ("swap", "problem"),
    [
        ("grpcio-1.85.4-cp311-cp311-manylinux2014_x86_64.whl", "not for CPython 3.12"),
        ("grpcio-1.85.4-cp312-cp312-macosx_11_0_arm64.whl", "platform macosx_11_0_arm64"),
        ("grpcio-1.85.4-cp312-cp312-manylinux2014_aarch64.whl", "platform manylinux2014_aarch64"),
        ("protobuf-6.33.6-cp313-abi3-manylinux2014_x86_64.whl", "not for CPython 3.12"),
    ],
)
def test_a_wheel_for_another_machine_is_named(gpu_check: ModuleType, tmp_path: Path, swap: str, problem: str) -> None:
    project = swap.split("-")[0]
    names = (*(n for n in GOOD if not n.startswith(project + "-")), swap)
    problems = gpu_check.wheel_problems(wheels(tmp_path / "w", names))
    assert any(swap in p and problem in p for p in problems), problems


def test_a_missing_wheel_is_named(gpu_check: ModuleType, tmp_path: Path) -> None:
    problems = gpu_check.wheel_problems(wheels(tmp_path / "w", GOOD[1:]))
    assert problems == ["no wheel of grpcio>=1.81.1"]
    assert "no such folder" in gpu_check.wheel_problems(tmp_path / "absent")[0]


def test_every_benchmark_accepts_the_flags_the_check_gives_it(gpu_check: ModuleType) -> None:
    assert gpu_check.command_problems(sys.executable) == []
    files = gpu_check.cuda_test_files()
    assert {"tests/test_cuda_path.py", "tests/test_ops.py", "tests/test_triton_lrn.py"} <= set(files)


def test_the_steps_fit_in_eight_minutes_with_room_for_the_install(gpu_check: ModuleType) -> None:
    assert sum(step.timeout_s for step in gpu_check.steps(sys.executable)) <= gpu_check.TOTAL_LIMIT_S - 30
