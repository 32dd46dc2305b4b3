"""Regenerate the committed Python stubs from the .proto files in this folder.

    python proto/generate.py           # rewrite the stub packages below
    python proto/generate.py --check   # exit 1 if the committed stubs differ (CI)

Two sets: the service protocol (``proto/*.proto``, into client/lrnserve/client/pb/) and the
model file formats the importers read (``proto/formats/*.proto``: Caffe's and ONNX's own field
numbers, into server/lrnserve/server/importers/pb/). Each set is compiled as if it lived at its
package path, so the generated modules import each other by their installed path. Needs the
pinned grpcio-tools and mypy-protobuf of the dev extra (the output depends on them).
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


@dataclass(frozen=True)
class StubSet:
    sources: Path  # folder of .proto files
    package: Path  # import path of the generated package
    root: Path  # source root the package lives under
    doc: str
    grpc: bool  # also generate service stubs

    @property
    def target(self) -> Path:
        return self.root / self.package


STUB_SETS = (
    StubSet(
        PROTO_DIR,
        Path("lrnserve/client/pb"),
        ROOT / "client",
        "Generated Open Inference Protocol v2 and grpc.health.v1 stubs (see proto/generate.py).",
        grpc=True,
    ),
    StubSet(
        PROTO_DIR / "formats",
        Path("lrnserve/server/importers/pb"),
        ROOT / "server",
        "Generated stubs of the Caffe and ONNX file formats' subsets (see proto/generate.py).",
        grpc=False,
    ),
)


def plugin(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(path).exists():
        raise SystemExit(f"{name} not found: pip install -e '.[dev]' (it comes with mypy-protobuf)")
    return path


def generate(stubs: StubSet, out: Path) -> None:
    """Write ``stubs``' package under the source root ``out``."""
    with tempfile.TemporaryDirectory() as tmp:
        source_root = Path(tmp)
        (source_root / stubs.package).mkdir(parents=True)
        sources = sorted(stubs.sources.glob("*.proto"))
        if not sources:
            return
        for source in sources:
            shutil.copy(source, source_root / stubs.package / source.name)
        out.mkdir(parents=True, exist_ok=True)
        args = [
            "grpc_tools.protoc",
            f"-I{source_root}",
            f"--python_out={out}",
            f"--plugin=protoc-gen-mypy={plugin('protoc-gen-mypy')}",
            f"--mypy_out={out}",
        ]
        if stubs.grpc:
            args += [
                f"--grpc_python_out={out}",
                f"--plugin=protoc-gen-mypy_grpc={plugin('protoc-gen-mypy_grpc')}",
                f"--mypy_grpc_out={out}",
            ]
        args += [str(stubs.package / s.name) for s in sources]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
    (out / stubs.package / "__init__.py").write_text(f'"""{stubs.doc}"""\n')
    (out / stubs.package / "py.typed").write_text("")


def check() -> int:
    stale = []
    for stubs in STUB_SETS:
        stale += _stale(stubs)
    if stale:
        print(f"\nstale generated stubs: {', '.join(stale)}; run: python proto/generate.py")
        return 1
    print("generated stubs are up to date")
    return 0


def _stale(stubs: StubSet) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        generate(stubs, fresh_root)
        fresh = fresh_root / stubs.package
        target = stubs.target
        present = {p.name for p in target.iterdir() if p.is_file()} if target.exists() else set()
        names = {p.name for p in fresh.iterdir()} | present
        names.discard("__pycache__")
        stale = []
        for name in sorted(names):
            a, b = target / name, fresh / name
            old = a.read_text() if a.exists() else ""
            new = b.read_text() if b.exists() else ""
            if old != new:
                stale.append(name)
                sys.stdout.writelines(
                    list(difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(a), str(b)))[:40]
                )
        return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    if args.check:
        return check()
    for stubs in STUB_SETS:
        generate(stubs, stubs.root)
        print(f"wrote {stubs.target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
