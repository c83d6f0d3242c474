"""The committed gRPC stubs are what scripts/generate_protos.sh makes of protos/*.proto."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "generate_protos.sh"


def generate(out: Path, script: Path = SCRIPT) -> None:
    result = subprocess.run(
        [str(script), str(out)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_the_committed_stubs_are_up_to_date(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh = sorted(p.name for p in (tmp_path / "protos").glob("*_pb2*.py*"))
    committed = sorted(p.name for p in (ROOT / "protos").glob("*_pb2*.py*"))
    assert (
        fresh
        == committed
        == ["auth_pb2.py", "auth_pb2.pyi", "auth_pb2_grpc.py", "auth_pb2_grpc.pyi"]
    )
    stale = [
        name
        for name in fresh
        if (tmp_path / "protos" / name).read_bytes() != (ROOT / "protos" / name).read_bytes()
    ]
    assert stale == [], f"stale stubs {stale}: run scripts/generate_protos.sh and commit them"


def test_a_changed_proto_makes_different_stubs(tmp_path: Path) -> None:
    """The comparison above can fail: the generator really reads the .proto file."""
    copy = tmp_path / "repo"
    (copy / "protos").mkdir(parents=True)
    (copy / "scripts").mkdir()
    (copy / "scripts" / SCRIPT.name).write_bytes(SCRIPT.read_bytes())
    (copy / "scripts" / SCRIPT.name).chmod(0o755)
    proto = (ROOT / "protos" / "auth.proto").read_text()
    changed = proto.replace("string created_at = 4;", "string created_at = 4;\n  string x = 5;")
    assert changed != proto
    (copy / "protos" / "auth.proto").write_text(changed)
    out = tmp_path / "out"
    generate(out, copy / "scripts" / SCRIPT.name)
    assert (out / "protos" / "auth_pb2.py").read_bytes() != (
        ROOT / "protos" / "auth_pb2.py"
    ).read_bytes()
