"""The checked-in gRPC modules are exactly what grpcio-tools generates from proto/ (protoc runs as a process)."""

from moe_serve.protos.generate import stale_files


def test_generated_code_is_current() -> None:
    assert stale_files() == [], "run: python -m moe_serve.protos.generate"
