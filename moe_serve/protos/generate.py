"""Generate the Python gRPC modules of this package from the `.proto` files in `proto/`.

Run `python -m moe_serve.protos.generate` after editing a `.proto` file; the generated modules
are checked in and `tests/unit/test_protos.py` fails when they are stale. The only post-processing is
the one every packaged gRPC project needs (MLServer does the same): protoc writes
`import x_pb2`, which must become `from . import x_pb2` inside a package.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_DIR = PACKAGE_DIR.parent.parent / "proto"
PROTO_FILES = ("grpc_predict_v2.proto", "model_config.proto", "moe_serve.proto")
_ABSOLUTE_PB2_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)


def generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Run protoc on every proto file into `out_dir`; return the files written."""
    from grpc_tools import protoc  # a dev dependency: only needed to regenerate

    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "protoc",
        f"-I{proto_dir}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(proto_dir / name) for name in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    written = sorted(p for p in out_dir.iterdir() if p.name.endswith(("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")))
    for path in written:
        text = path.read_text()
        path.write_text(_ABSOLUTE_PB2_IMPORT.sub(r"from . import \1 as \2", text))
    return written


def stale_files(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Names of checked-in generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [
            p.name
            for p in fresh
            if not (package_dir / p.name).exists() or (package_dir / p.name).read_text() != p.read_text()
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report stale files; exit 1 if any")
    options = parser.parse_args(argv)
    if options.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {name}", file=sys.stderr)
        return 1 if stale else 0
    for path in generate(PACKAGE_DIR):
        print(f"wrote {path.relative_to(PACKAGE_DIR.parent.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
