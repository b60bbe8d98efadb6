"""The committed gRPC stubs are exactly what scripts/gen_protos.sh makes from proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_current(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)],
        check=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        capture_output=True,
    )
    committed = ROOT / "tail_service" / "proto"
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated == sorted(
        p.name for p in committed.iterdir() if p.is_file() and p.suffix in (".py", ".pyi")
    )
    for name in generated:
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), (
            f"tail_service/proto/{name} is stale: run bash scripts/gen_protos.sh"
        )
