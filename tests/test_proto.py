"""The committed generated code is exactly what `python -m proto.generate` produces."""

from pathlib import Path

from proto.generate import PROTO_DIR, generate


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    assert {p.name for p in fresh} == {"freshrec_pb2.py", "freshrec_pb2.pyi", "freshrec_pb2_grpc.py"}
    for path in fresh:
        committed = PROTO_DIR / path.name
        assert committed.exists(), f"{committed} missing: run python -m proto.generate"
        assert committed.read_text() == path.read_text(), f"{committed.name} is stale: run python -m proto.generate"
