"""Regenerate the committed Python stubs from the .proto files in this folder.

    python proto/generate.py           # rewrite client/lrnserve/client/pb/
    python proto/generate.py --check   # exit 1 if the committed stubs differ (CI)

The .proto files are compiled as if they lived at lrnserve/client/pb/, so the
generated modules import each other by their installed package path. Needs the
pinned grpcio-tools and mypy-protobuf of the dev extra (the output depends on them).
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PACKAGE = Path("lrnserve/client/pb")
TARGET = ROOT / "client" / PACKAGE
INIT = '"""Generated Open Inference Protocol v2 and grpc.health.v1 stubs (see proto/generate.py)."""\n'


def plugin(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(path).exists():
        raise SystemExit(f"{name} not found: pip install -e '.[dev]' (it comes with mypy-protobuf)")
    return path


def generate(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source_root = Path(tmp)
        (source_root / PACKAGE).mkdir(parents=True)
        sources = sorted(PROTO_DIR.glob("*.proto"))
        for source in sources:
            shutil.copy(source, source_root / PACKAGE / source.name)
        out.mkdir(parents=True, exist_ok=True)
        args = [
            "grpc_tools.protoc",
            f"-I{source_root}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--plugin=protoc-gen-mypy={plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={plugin('protoc-gen-mypy_grpc')}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            *(str(PACKAGE / s.name) for s in sources),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
    (out / PACKAGE / "__init__.py").write_text(INIT)
    (out / PACKAGE / "py.typed").write_text("")


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        generate(fresh_root)
        fresh = fresh_root / PACKAGE
        names = {p.name for p in fresh.iterdir()} | {p.name for p in TARGET.iterdir() if p.is_file()}
        names.discard("__pycache__")
        stale = []
        for name in sorted(names):
            a, b = TARGET / name, fresh / name
            old = a.read_text() if a.exists() else ""
            new = b.read_text() if b.exists() else ""
            if old != new:
                stale.append(name)
                sys.stdout.writelines(
                    list(difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(a), str(b)))[:40]
                )
        if stale:
            print(f"\nstale generated stubs: {', '.join(stale)}; run: python proto/generate.py")
            return 1
    print("generated stubs are up to date")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    if args.check:
        return check()
    generate(ROOT / "client")
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
