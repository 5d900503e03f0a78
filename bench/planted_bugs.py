"""Plant the bugs issue 14 names, one at a time, and show which named test catches each.

Each bug is one textual change to one module (the promise it breaks: validate's tolerance,
the gate's NaN and threshold checks, the compat refusal, the registry's "version exists"
refusal). For each, a clean copy of the revision (`git archive`) gets the change, and the
named tests run against it: the bug is *caught* when they fail. The same tests must pass on
the unchanged copy first, so a failure is the bug's doing. Writes JSON (`--out`).

    python bench/planted_bugs.py --out bench/results/planted_bugs.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BUGS = [
    {"id": "validate ignores validate.atol", "file": "pipeline/stages/validate.py",
     "old": 'if not a["max_abs_diff"] <= atol:', "new": "if False:",
     "tests": ["tests/test_validate_tolerances.py::test_validate_fails_on_atol_exceeded",
               "tests/test_validate_tolerances.py::test_check_output_atol_boundary_and_message"]},
    {"id": "gate passes a NaN drop", "file": "pipeline/gate.py",
     "old": "if d != d:  # a NaN on either side", "new": "if False:  # a NaN on either side",
     "tests": ["tests/test_gate.py::test_nan_metric_or_agreement_fails_naming_it"]},
    {"id": "gate drop threshold never fails", "file": "pipeline/gate.py",
     "old": "elif d > thr + EPS:", "new": "elif False:",
     "tests": ["tests/test_gate.py::test_drop_thresholds_and_boundaries",
               "tests/test_gate.py::test_broken_int8_fails_naming_metric_threshold_and_value"]},
    {"id": "compat check ignored", "file": "pipeline/compat.py",
     "old": "    if findings:\n        raise ArtifactError", "new": "    if False:\n        raise ArtifactError",
     "tests": ["tests/test_compat_probes.py::test_compat_refusal_names_both_sides_of_a_tensorrt_and_gpu_mismatch"]},
    {"id": "registry 'version exists' guard removed", "file": "pipeline/registry.py",
     "old": "        if a != b:\n            raise ArtifactError(", "new": "        if False:\n            raise ArtifactError(",
     "tests": ["tests/test_registry_refusals.py::test_same_version_with_other_artifact_bytes_is_refused"]},
]


def _copy(rev: str, dest: Path) -> None:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def _pytest(cwd: Path, tests: list[str]) -> tuple[int, str, float]:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *tests],
                       cwd=cwd, capture_output=True, text=True)
    tail = [line for line in (p.stdout + p.stderr).splitlines() if line.strip()][-1:]
    return p.returncode, tail[0] if tail else "", round(time.monotonic() - t0, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="trtpipe-planted-") as tmp:
        for bug in BUGS:
            work = Path(tmp) / str(len(rows))
            work.mkdir()
            _copy(a.rev, work)
            rc_clean, tail_clean, _ = _pytest(work, bug["tests"])
            path = work / bug["file"]
            text = path.read_text()
            if text.count(bug["old"]) != 1:
                raise SystemExit(f"{bug['file']}: the text to change is not there exactly once: {bug['old']!r}")
            path.write_text(text.replace(bug["old"], bug["new"]))
            rc, tail, secs = _pytest(work, bug["tests"])
            row = {**{k: bug[k] for k in ("id", "file", "old", "new", "tests")},
                   "clean_passes": rc_clean == 0, "clean": tail_clean, "caught": rc != 0 and rc_clean == 0,
                   "with_bug": tail, "seconds": secs}
            rows.append(row)
            print(f"{'caught' if row['caught'] else 'MISSED'}: {bug['id']} -> {tail}", flush=True)
    a.out.write_text(json.dumps({"rev": subprocess.run(["git", "-C", str(ROOT), "rev-parse", a.rev], capture_output=True,
                                                       text=True).stdout.strip(), "bugs": rows}, indent=2) + "\n")
    return 0 if all(r["caught"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
