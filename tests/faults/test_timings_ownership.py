"""`--timings FILE` is an output like any other: it may replace only an earlier timings file,
and it is refused before the stage does any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main


@pytest.mark.parametrize("victim, content", [("model.pt", b"precious weights"), ("configs/digits.yaml", None),
                                             ("report.json", b'{"stage": "validate", "passed": true}\n')])
def test_timings_never_replaces_a_file_it_did_not_write(project: Path, capsys: pytest.CaptureFixture[str],
                                                        victim: str, content: bytes | None) -> None:
    path = project / victim
    if content is not None:
        path.write_bytes(content)
    before = path.read_bytes()
    assert main(["prepare", "--out", "art/prepare", "--timings", victim]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--timings {victim}:" in err[0] and "timings file" in err[0]
    assert path.read_bytes() == before
    assert not (project / "art").exists()  # refused before any work


def test_timings_replaces_its_own_earlier_file(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert main(["prepare", "--out", "art/prepare", "--timings", "t.json"]) == 0
    first = json.loads((project / "t.json").read_text())
    assert first["stage"] == "prepare" and first["seconds"] > 0
    assert main(["prepare", "--out", "art/prepare", "--timings", "t.json"]) == 0
    assert json.loads((project / "t.json").read_text())["stage"] == "prepare"
    assert main(["prepare", "--out", "art/prepare", "--timings", "art"]) == 1  # a folder
    assert "--timings art: is a folder" in capsys.readouterr().err
