"""One command that proves the GPU path on a lent GPU machine: ``make gpu-check``.

The GPU machine has no network, Python 3.12, torch with CUDA, Triton, numpy, protobuf, grpcio,
prometheus-client, uvloop, pytest, hypothesis, onnx and onnxruntime, but not grpcio-reflection,
pytest-timeout or this project. So, in two steps:

1. ``make gpu-wheels`` (here, with the package registries): ``python bench/gpu_check.py
   download`` puts the wheels the check needs for CPython 3.12 on manylinux x86-64 in
   ``.gpu-wheels/`` (ignored by git; carry it to the GPU machine with the tree);
2. ``make gpu-check`` (there): ``python3 bench/gpu_check.py`` makes ``.gpu-venv`` over the
   machine's own packages (``--system-site-packages``: its CUDA torch and Triton), installs the
   wheels without network and the project from this tree (a ``.pth`` file naming ``client/``
   and ``server/``, as an editable install does), then runs, each step with its own time limit
   (at most 7 min 20 s of steps, 8 minutes with the install):
   every CUDA test (``pytest -m cuda`` over the files that have them); ``bench/ops.py --device
   cuda``; ``bench/networks.py --device cuda``; ``bench/serve.py --device cuda``. It writes one
   markdown report (GPU, driver, versions, every step's tables and outcome) to ``--report``
   (default ``$OUT/gpu-check.md`` when ``$OUT`` is set, else ``gpu-check.md``).

``--dry-run`` needs no GPU: it checks that the wheel folder has every wheel, each for CPython 3.12
on x86-64 Linux (or pure Python), that every benchmark accepts the flags the check gives it, and
prints the commands.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".gpu-wheels"
VENV = ROOT / ".gpu-venv"
# What the GPU machine lacks; grpcio and protobuf too, in case its own are older than the
# committed stubs need (pip keeps the machine's when they are new enough).
REQUIREMENTS = ("grpcio-reflection==1.81.1", "grpcio>=1.81.1", "protobuf>=6.33.5", "pytest-timeout>=2.2")
TARGET = ("--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "none")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")


@dataclass(frozen=True)
class Step:
    title: str
    argv: tuple[str, ...]
    timeout_s: int
    help_check: tuple[str, ...] | None = None  # a --help run that proves the flags exist (dry run)


def cuda_test_files() -> list[str]:
    return sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "pytest.mark.cuda" in p.read_text()
    )


TOTAL_LIMIT_S = 480  # the 8 minutes for the whole check


def steps(python: str) -> list[Step]:
    ops = ("bench/ops.py", "--device", "cuda", "--reps", "20")
    networks = ("bench/networks.py", "--device", "cuda", "--networks", "alexnet,googlenet")
    networks += ("--dtypes", "float32,float16", "--batches", "1,8,32,128", "--compile-batches", "128")
    serve = ("bench/serve.py", "--device", "cuda", "--cases", "lrn96,alexnet", "--concurrency", "1,32,128")
    serve += ("--duration", "4", "--reps", "1", "--skip-metrics-overhead", "--no-echo")
    return [
        Step("CUDA tests", (python, "-m", "pytest", "-m", "cuda", "-q", "-rA", *cuda_test_files()), 110),
        Step("The LRN op (bench/ops.py --device cuda)", (python, *ops), 70, (python, "bench/ops.py", "--help")),
        Step(
            "Networks (bench/networks.py --device cuda)",
            (python, *networks),
            140,
            (python, "bench/networks_cuda.py", "--help"),
        ),
        Step("Serving (bench/serve.py --device cuda)", (python, *serve), 120, (python, "bench/serve.py", "--help")),
    ]


# ---- the wheels ----


def download(folder: Path) -> None:
    """The wheels for the GPU machine, and nothing for this one."""
    folder.mkdir(exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--dest", str(folder)]
    subprocess.run([*command, *TARGET, *platforms, *REQUIREMENTS], check=True)
    print(f"{len(list(folder.glob('*.whl')))} wheels in {folder}")


def wheel_problems(folder: Path) -> list[str]:
    """Why the wheel set would not install on CPython 3.12, x86-64 Linux; empty when it would."""
    if not folder.is_dir():
        return [f"{folder}: no such folder (make gpu-wheels)"]
    wheels = {w.name: w for w in folder.glob("*.whl")}
    problems = []
    for name in wheels:
        tags = name.removesuffix(".whl").split("-")[-3:]  # python, abi, platform
        python, abi, plat = tags
        stable = abi == "abi3" and any(int(t[3:] or 0) <= 12 for t in python.split(".") if t.startswith("cp3"))
        if not ({"cp312", "py3"} & set(python.split(".")) or stable):
            problems.append(f"{name}: not for CPython 3.12 ({python})")
        elif abi not in ("cp312", "abi3", "none"):
            problems.append(f"{name}: abi {abi}")
        elif plat != "any" and not re.search(r"linux.*x86_64", plat):
            problems.append(f"{name}: platform {plat}")
    for requirement in REQUIREMENTS:
        project = re.split(r"[=<>]", requirement)[0].replace("-", "_").lower()
        if not any(n.lower().startswith(project + "-") for n in wheels):
            problems.append(f"no wheel of {requirement}")
    return problems


# ---- the check ----


def install(python: str) -> str:
    """``.gpu-venv`` over the machine's packages, the wheels, the tree; its python."""
    subprocess.run([python, "-m", "venv", "--system-site-packages", str(VENV)], check=True)
    venv_python = str(VENV / "bin" / "python")
    pip = [venv_python, "-m", "pip", "install", "--no-index", "--find-links", str(WHEELS), "--quiet"]
    subprocess.run([*pip, *REQUIREMENTS], check=True)
    site = subprocess.run(
        [venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "lrnserve-tree.pth").write_text(f"{ROOT / 'client'}\n{ROOT / 'server'}\n")
    return venv_python


def machine(python: str) -> str:
    probe = (
        "import torch, platform; import triton; "
        "print(f'- GPU: {torch.cuda.get_device_name()}'); "
        "print(f'- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
        "Triton {triton.__version__}, Python {platform.python_version()}')"
    )
    lines = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120).stdout
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"{lines}- nvidia-smi: {smi or 'not available'}\n- host: {platform.node()}, {os.cpu_count()} CPUs\n"


def run_step(step: Step) -> tuple[str, bool]:
    """The step's report section and whether it passed."""
    start = time.monotonic()
    try:
        done = subprocess.run(step.argv, cwd=ROOT, capture_output=True, text=True, timeout=step.timeout_s)
        output, ok, outcome = done.stdout + done.stderr, done.returncode == 0, f"exit {done.returncode}"
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        ok, outcome = False, f"stopped at its {step.timeout_s} s limit"
    seconds = time.monotonic() - start
    print(f"{step.title}: {outcome} in {seconds:.0f} s", flush=True)
    tables = [line for line in output.splitlines() if line.startswith("|")]
    body = "\n".join(tables) if tables and ok else "```\n" + output[-6000:] + "\n```"
    if tables and ok:
        notes = [line for line in output.splitlines() if line and not line.startswith("|")][-6:]
        body = "\n".join(notes[:2]) + "\n\n" + body + "\n\n" + "\n".join(notes[2:])
    return f"## {step.title}\n\n`{' '.join(step.argv[1:])}`: {outcome} in {seconds:.0f} s\n\n{body}\n", ok


def command_problems(python: str) -> list[str]:
    """Why a step's command would not run as written (a script missing, a flag it lacks)."""
    problems = []
    for step in steps(python):
        if step.help_check is not None:
            done = subprocess.run(step.help_check, cwd=ROOT, capture_output=True, text=True, timeout=120)
            flags = {a for a in step.argv if a.startswith("--")}
            missing = sorted(f for f in flags if f not in done.stdout)
            if done.returncode != 0 or missing:
                problems.append(f"{' '.join(step.help_check[1:])}: exit {done.returncode}, no {missing}")
    if not cuda_test_files():
        problems.append("no test file has a pytest.mark.cuda test")
    return problems


def dry_run(python: str) -> int:
    for step in steps(python):
        print(f"{step.title} (limit {step.timeout_s} s): {' '.join(step.argv)}")
    problems = wheel_problems(WHEELS) + command_problems(python)
    print("\n".join(f"problem: {p}" for p in problems) or "dry run: the wheels and the commands are in order")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", nargs="?", choices=("check", "download"), default="check")
    parser.add_argument("--dry-run", action="store_true", help="check the wheels and the commands; no GPU needed")
    parser.add_argument("--report", type=Path, help="where the markdown report goes")
    args = parser.parse_args()
    if args.action == "download":
        download(WHEELS)
        return 0
    if args.dry_run:  # the benchmarks' --help needs torch: the development environment's python when there is one
        dev = ROOT / ".venv" / "bin" / "python"
        return dry_run(str(dev) if dev.exists() else sys.executable)
    report = args.report or Path(os.environ.get("OUT", ".")) / "gpu-check.md"
    probe = [sys.executable, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"]
    if subprocess.run(probe, timeout=120).returncode != 0:
        print("no CUDA device here: make gpu-check runs on a GPU machine (ARGS=--dry-run checks it without one)")
        return 2
    if problems := wheel_problems(WHEELS):
        print("\n".join(problems), file=sys.stderr)
        return 1
    python = install(sys.executable)
    sections = [f"# lrnserve gpu-check, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n{machine(python)}"]
    failed = []
    for step in steps(python):
        section, ok = run_step(step)
        sections.append(section)
        report.write_text("\n".join(sections))  # what is done so far survives a later step's stop
        if not ok:
            failed.append(step.title)
    print(f"report: {report}; {'all steps passed' if not failed else 'failed: ' + ', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
