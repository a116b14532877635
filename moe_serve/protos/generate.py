"""Generate the Python gRPC modules from the `.proto` files in `proto/`.

Run `python -m moe_serve.protos.generate` after editing a `.proto` file; the generated modules
are checked in and `tests/integration/test_protos.py` fails when they are stale. The KServe v2 protocol
(`grpc_predict_v2.proto`, `model_config.proto`) goes to the light client distribution
(`clients/python/moe_serve_client/protos`), which the gateway imports too; the internal protocol
(`moe_serve.proto`) stays here.

Two post-processing steps, both mechanical:
- protoc writes `import x_pb2`, which must become `from . import x_pb2` inside a package (MLServer
  does the same);
- the KServe modules register their files in the client's private descriptor pool
  (`moe_serve_client.protos._pool`) instead of protobuf's default one: tritonclient and kserve
  define the same `inference.*` symbols in the default pool, and a second definition there fails
  at import ("duplicate symbol 'inference.ServerLiveRequest'"). Wire names (`/inference.
  GRPCInferenceService/ModelInfer`) do not depend on the pool.

The gencode must run on every protobuf the packages accept (`>=6.30`): the test extra pins the
grpcio-tools that generates it (its protoc writes a runtime check for its own protobuf version).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent.parent
PROTO_DIR = REPOSITORY / "proto"
_ABSOLUTE_PB2_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)
_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL = "_pool.POOL.AddSerializedFile("
_IMPORTS_END = "# @@protoc_insertion_point(imports)\n"


@dataclass(frozen=True)
class Target:
    """Which proto files go to which package, and whether they register in the private pool."""

    package_dir: Path
    proto_files: tuple[str, ...]
    private_pool: bool


TARGETS = (
    Target(
        REPOSITORY / "clients" / "python" / "moe_serve_client" / "protos",
        ("grpc_predict_v2.proto", "model_config.proto"),
        private_pool=True,
    ),
    Target(REPOSITORY / "moe_serve" / "protos", ("moe_serve.proto",), private_pool=False),
)


def _post_process(text: str, private_pool: bool) -> str:
    text = _ABSOLUTE_PB2_IMPORT.sub(r"from . import \1 as \2", text)
    if private_pool and _DEFAULT_POOL in text:
        text = text.replace(_DEFAULT_POOL, _PRIVATE_POOL).replace(
            _IMPORTS_END, _IMPORTS_END + "from . import _pool\n", 1
        )
    return text


def generate(target: Target, out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Run protoc on the target's proto files into `out_dir`; return the files written.

    protoc runs as a process of its own: grpcio-tools bundles protobuf and abseil builds that crash a
    process which has loaded NIXL's (moe_serve/runtime/nixl_transport.py), as a test session does."""
    spec = importlib.util.find_spec("grpc_tools")  # a dev dependency: only needed to regenerate
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("grpcio-tools is not installed (pip install -e '.[test]')")
    include = Path(spec.submodule_search_locations[0]) / "_proto"
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(proto_dir / name) for name in target.proto_files),
    ]
    finished = subprocess.run(args, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}\n{finished.stderr}")
    written = sorted(p for p in out_dir.iterdir() if p.name.endswith(("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")))
    for path in written:
        path.write_text(_post_process(path.read_text(), target.private_pool))
    return written


def stale_files() -> list[str]:
    """Names of checked-in generated files that differ from a fresh generation."""
    stale = []
    for target in TARGETS:
        with tempfile.TemporaryDirectory() as tmp:
            for fresh in generate(target, Path(tmp)):
                checked_in = target.package_dir / fresh.name
                if not checked_in.exists() or checked_in.read_text() != fresh.read_text():
                    stale.append(str(checked_in.relative_to(REPOSITORY)))
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report stale files; exit 1 if any")
    options = parser.parse_args(argv)
    if options.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {name}", file=sys.stderr)
        return 1 if stale else 0
    for target in TARGETS:
        for path in generate(target, target.package_dir):
            print(f"wrote {path.relative_to(REPOSITORY)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
