"""The committed generated code is exactly what `python -m proto.generate` produces."""

from pathlib import Path

from proto.generate import PROTO_DIR, generate


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    protos = [p.stem for p in PROTO_DIR.glob("*.proto")]
    assert {p.name for p in fresh} == {f"{s}{ext}" for s in protos for ext in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")}
    for path in fresh:
        committed = PROTO_DIR / path.name
        assert committed.exists(), f"{committed} missing: run python -m proto.generate"
        assert committed.read_text() == path.read_text(), f"{committed.name} is stale: run python -m proto.generate"
