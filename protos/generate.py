"""Regenerates the Python stubs from the .proto sources: `python -m protos.generate`.

`--check` compares freshly generated stubs with the committed ones and exits 1 when they differ,
so a stale stub fails the test suite instead of failing at runtime.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PROTOS_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTOS_DIR.parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_sources() -> list[Path]:
    return sorted(PROTOS_DIR.glob("*.proto"))


def generate_into(out_root: Path) -> list[Path]:
    """Runs protoc with the repo root as include path, so stubs import each other as `protos.x`."""
    from grpc_tools import protoc

    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "protos").mkdir(exist_ok=True)
    sources = [str(p.relative_to(REPO_ROOT)) for p in proto_sources()]
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{REPO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted(p for p in (out_root / "protos").iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def stale_stubs() -> list[str]:
    """Names of generated files whose committed copy differs from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_bytes() for p in generate_into(Path(tmp))}
    committed = {
        p.name: p.read_bytes() for p in PROTOS_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES)
    }
    return sorted(n for n in fresh.keys() | committed.keys() if fresh.get(n) != committed.get(n))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_stubs()
        if stale:
            print(f"stale gRPC stubs: {', '.join(stale)}; run `make protos`", file=sys.stderr)
            return 1
        print("gRPC stubs are current")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for generated in generate_into(Path(tmp)):
            (PROTOS_DIR / generated.name).write_bytes(generated.read_bytes())
            print(f"wrote protos/{generated.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
