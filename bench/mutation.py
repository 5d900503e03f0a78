"""Mutation testing of the modules whose answers users act on (mutmut 3.x).

    python bench/mutation.py [--modules M ...] [--rev REV] [--jobs N] [--out JSON] [--md MD]
                             [--equivalent FILE] [--all-tests] [--keep] [--workdir DIR]

Never touches this checkout: the project (the git-tracked files of --rev, or of the working
tree when --rev is not given, including untracked files that git does not ignore) is copied
into a scratch folder per module, and mutmut runs there.  Per module it runs only the tests
listed in MODULES below (without the `slow` and `gpu` markers), and inside those mutmut's own
per-test selection: a first pass records which test calls which function (through mutmut's
trampolines), and each mutant then runs only the tests that reached its function, fastest
first, stopping at the first failure.  Calls made by a test through a subprocess (the CLI
tests run `python -m pipeline ...`) are recorded too (see _SITECUSTOMIZE).

Writes JSON (--out): per module the number of mutants, killed, survived, timeout, no tests,
skipped, equivalent, score = killed / (mutants - equivalent), the wall time, and every mutant
that no test caught, with its line, the original and the mutated line and the function diff.
--equivalent names a JSON or YAML list of {module, line, mutation, original?, reason} entries:
mutants judged equivalent (no test can tell them apart from the original); they leave the
score's denominator.  docs/mutation.md describes the run, the JSON and the equivalent file.
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import difflib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# The modules to mutate and, for each, the test files whose tests can reach it.  mutmut picks,
# per mutant, the tests among these that actually called the mutated function.  To add a module:
# add a line; to check a module's list, run it once with --all-tests (every fast test) and
# compare `tests_reaching` in the JSON with the list here.
# --------------------------------------------------------------------------------------------
MODULES: dict[str, list[str]] = {
    "pipeline/stages/validate.py": [
        "tests/test_validate_tolerances.py",
        "tests/test_registry.py",
        "tests/stages/test_evaluate.py",
        "tests/stages/test_compare.py",
        "tests/stages/test_publish.py",
        "tests/test_cli_errors.py",
    ],
    "pipeline/gate.py": [
        "tests/test_gate.py",
        "tests/test_gate_report.py",
    ],
    "pipeline/compat.py": [
        "tests/test_compat_probes.py",
        "tests/test_registry.py",
        "tests/stages/test_publish.py",
        "tests/runtime/test_runtime_cpu.py",
    ],
    "pipeline/provenance.py": [
        "tests/test_provenance_checks.py",
        "tests/test_validate_tolerances.py",
    ],
    "pipeline/registry.py": [
        "tests/test_registry_refusals.py",
        "tests/test_manifest_integrity.py",
        "tests/test_registry.py",
        "tests/stages/test_publish.py",
    ],
    "pipeline/manifest.py": [
        "tests/test_manifest_integrity.py",
        "tests/test_registry_refusals.py",
        "tests/test_manifest.py",
        "tests/test_registry.py",
        "tests/stages/test_publish.py",
        "tests/runtime/test_runtime_cpu.py",
    ],
    "calibration/cache.py": [
        "tests/calibration/test_cache_format.py",
        "tests/calibration/test_cache.py",
        "tests/stages/test_calibrate_stage.py",
        "tests/stages/test_publish.py",
        "tests/runtime/test_runtime_cpu.py",
    ],
    "calibration/algorithms.py": [
        "tests/calibration/test_algorithms_reference.py",
        "tests/calibration/test_rules_ranges.py",
        "tests/calibration/test_entropy.py",
        "tests/calibration/test_qdq.py",
        "tests/stages/test_calibrate_stage.py",
    ],
    "calibration/rules.py": [
        "tests/calibration/test_rules_ranges.py",
        "tests/calibration/test_rules.py",
        "tests/stages/test_calibrate_stage.py",
    ],
}

# Packages mutmut copies into its mutants/ folder (the mutated module's package must be here).
SOURCE_PATHS = ["pipeline", "calibration"]
# Other files the tests read relative to the repository root (tests/ and pyproject.toml are
# copied by mutmut itself).
ALSO_COPY = ["configs", "params.yaml", "dvc.yaml"]
MARKERS = "not gpu and not slow"
# A mutant's test run is stopped after (expected test time + TIMEOUT_CONSTANT) * TIMEOUT_MULTIPLIER
# seconds of wall time (expected: test bodies plus their fixtures' setup, see _PLUGIN);
# generous, as the machine is shared: only a mutant that hangs should hit it.
TIMEOUT_CONSTANT = 15.0
TIMEOUT_MULTIPLIER = 3.0

# mutmut's exit-code -> status table (mutmut.stats.status_by_exit_code), folded into the
# categories reported here.
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no_tests", 33: "no_tests", 34: "skipped",
          36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout",
          37: "caught_by_type_check", 2: "interrupted", None: "not_checked"}
COUNTED = ["killed", "survived", "timeout", "no_tests", "skipped", "suspicious", "segfault",
           "interrupted", "not_checked", "caught_by_type_check"]

# Put on PYTHONPATH of the mutmut run (and copied into mutants/, which the CLI tests put on the
# PYTHONPATH of their subprocesses).  While mutmut records which test reaches which function
# ("stats"), a subprocess would otherwise try to load mutmut's config from its own working
# folder and crash; here it appends "test id <TAB> function" lines to a file instead, using the
# test id pytest exports as PYTEST_CURRENT_TEST.  bench/mutation.py merges those lines into
# mutmut's stats before the mutants run.  For any other mode it does nothing.
_SITECUSTOMIZE = '''\
# Written by bench/mutation.py into its scratch copy; not part of the project.
import os

if os.environ.get("MUTANT_UNDER_TEST") == "stats" and os.environ.get("MUTATION_SUBPROCESS_HITS"):
    def _record(name, caller=None, _path=os.environ["MUTATION_SUBPROCESS_HITS"]):
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
        if test:
            with open(_path, "a") as f:
                f.write(test + "\\t" + name + "\\n")

    import mutmut.mutation.trampoline as _trampoline

    _trampoline.record_trampoline_hit = _record
'''

# A pytest plugin (-p _mutation_plugin, copied into mutants/), for speed without changing what is
# tested.  (1) mutmut runs a mutant's tests fastest first and stops at the first failure, but it
# times a test by its body alone: a test whose fixture trains and exports a model looks as cheap
# as a unit test.  The plugin times each fixture's setup during mutmut's stats pass and writes
# per test its body plus its fixtures' setup; bench/mutation.py puts those into mutmut's stats.
# (2) Each mutant is a new pytest session, so module- and session-scoped fixtures (a trained
# digits run, a published registry: seconds each) would be rebuilt for every mutant.  The
# plugin keeps their values from the stats pass, with the functions of the mutated module their
# setup called, and serves them to a mutant whose function none of them called: for such a
# mutant a rebuilt fixture would be the same.  A mutant of a function that a fixture calls gets
# every fixture built from the mutated code.
_PLUGIN = '''\
# Written by bench/mutation.py into its scratch copy; not part of the project.
"""pytest plugin for the mutation run (bench/mutation.py).

1. Test costs.  While mutmut records its stats (MUTANT_UNDER_TEST=stats), time each fixture's
   own setup and write, per test, its body plus the setup of every fixture it uses.
2. Fixture cache.  While mutmut records its stats, keep the value (and the files under pytest's
   tmp folder it points to) of every module- or session-scoped fixture defined under tests/, with
   the mutated module's functions its setup called.  Later sessions (the clean run, each
   mutant) get the kept value, its files copied into their own tmp folder, instead of building
   it again, unless the mutant's function is among the functions that any of these fixtures
   called (then every fixture is built as usual, from the mutated code)."""
import dataclasses
import inspect
import json
import os
import pickle
import shutil
import time
from pathlib import Path, PurePath
from types import SimpleNamespace

import pytest

COSTS = os.environ.get("MUTATION_TEST_COSTS")
CACHE = os.environ.get("MUTATION_FIXTURE_CACHE")


def _mode():  # read each time: the fork server imports this module before the mutant is chosen
    return os.environ.get("MUTANT_UNDER_TEST", "")

MARK = "/__mutation_fixture_base__"

_fixture_seconds = {}
_call_seconds = {}
_closure = {}
_recording = []      # stack of sets: functions called while a fixture is being set up
_hits = {}           # fixture key -> functions its setup (and its dependencies') called
_entries = {}        # fixture key -> pickle file name


def _patch_trampoline():
    """Let the trampolines also report each call to the fixtures being set up."""
    import mutmut.mutation.trampoline as trampoline

    original = trampoline.record_trampoline_hit
    if getattr(original, "_mutation_plugin", False):
        return

    def record(name, caller=None):
        for s in _recording:
            s.add(name)
        return original(name, caller)

    record._mutation_plugin = True
    trampoline.record_trampoline_hit = record


def _key(fixturedef):
    return f"{fixturedef.baseid}::{fixturedef.argname}"


def _cacheable(fixturedef):
    func = getattr(fixturedef, "func", None)
    return (fixturedef.scope in ("module", "session", "package", "class") and func is not None
            and fixturedef.params is None and not inspect.isgeneratorfunction(func)
            and (func.__module__ or "").startswith(("tests.", "conftest")))


def _walk(value, fn):
    if isinstance(value, (PurePath, str)):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_walk(v, fn) for v in value))
    if isinstance(value, (list, tuple, set, frozenset)):
        return type(value)(_walk(v, fn) for v in value)
    if isinstance(value, dict):
        return type(value)((_walk(k, fn), _walk(v, fn)) for k, v in value.items())
    if isinstance(value, SimpleNamespace):
        return SimpleNamespace(**{k: _walk(v, fn) for k, v in vars(value).items()})
    fields = getattr(type(value), "model_fields", None)
    if isinstance(fields, dict) and hasattr(value, "model_copy"):
        return value.model_copy(update={k: _walk(getattr(value, k), fn) for k in fields})
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _walk(getattr(value, f.name), fn)
                                             for f in dataclasses.fields(value) if f.init})
    return value


def _moved(old, new, roots=None):
    old, new = str(old).rstrip("/"), str(new).rstrip("/")

    def fn(v):
        s = str(v)
        if s == old or s.startswith(old + "/"):
            rest = s[len(old):]
            if roots is not None:
                roots.add(rest.lstrip("/").split("/")[0])
            return type(v)(new + rest) if isinstance(v, PurePath) else new + rest
        return v
    return fn


def _mutant_function():
    mode = _mode()
    return mode.partition("__mutmut_")[0] if "__mutmut_" in mode else None


class _Plugin:
    def __init__(self):
        self.index = None
        if CACHE and _mode() != "stats":
            try:
                self.index = json.loads((Path(CACHE) / "index.json").read_text())
            except (OSError, ValueError):
                self.index = None
        fn = _mutant_function()
        if self.index is not None and fn is not None and fn in self.index["hits"]:
            self.index = None  # this mutant's function is used to build fixtures: build them all

    @pytest.hookimpl(tryfirst=True)
    def pytest_fixture_setup(self, fixturedef, request):
        if self.index is None or not _cacheable(fixturedef):
            return None
        name = self.index["entries"].get(_key(fixturedef))
        if name is None:
            return None
        stored = pickle.loads((Path(CACHE) / name).read_bytes())
        dest = request.getfixturevalue("tmp_path_factory").mktemp("cached-" + fixturedef.argname)
        for root in stored["roots"]:
            shutil.copytree(Path(CACHE) / stored["files"] / root, dest / root, symlinks=True)
        value = _walk(stored["value"], _moved(MARK, dest))
        fixturedef.cached_result = (value, fixturedef.cache_key(request), None)
        return value


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    recording = _mode() == "stats" and CACHE and _cacheable(fixturedef)
    if recording:
        _recording.append(set())
    t = time.perf_counter()
    try:
        outcome = yield
    finally:
        called = _recording.pop() if recording else None
    key = (fixturedef.baseid, fixturedef.argname)
    _fixture_seconds[key] = max(_fixture_seconds.get(key, 0.0), time.perf_counter() - t)
    if not recording or outcome.excinfo is not None or fixturedef.cached_result is None:
        return
    for arg in fixturedef.argnames:  # what its dependencies called counts too
        try:
            deps = request._fixturemanager.getfixturedefs(arg, request.node) or ()
        except Exception:
            deps = ()
        for d in deps:
            called |= _hits.get(_key(d), set())
    _hits[_key(fixturedef)] = called
    try:
        _store(fixturedef, request, fixturedef.cached_result[0])
    except Exception:  # not picklable, or points at files it cannot move: build it every time
        pass


def _store(fixturedef, request, value):
    base = request.getfixturevalue("tmp_path_factory").getbasetemp()
    roots = set()
    moved = _walk(value, _moved(base, MARK, roots))
    if "" in roots:
        return
    data = pickle.dumps({"value": moved, "roots": sorted(roots), "files": ""})
    if str(base).encode() in data or base.name.encode() in data:
        return  # a path inside an object this plugin cannot rewrite
    n = len(_entries)
    files = f"files-{n}"
    for root in roots:
        shutil.copytree(base / root, Path(CACHE) / files / root, symlinks=True)
    (Path(CACHE) / f"value-{n}.pickle").write_bytes(
        pickle.dumps({"value": moved, "roots": sorted(roots), "files": files}))
    _entries[_key(fixturedef)] = f"value-{n}.pickle"


def pytest_configure(config):
    if _mode() == "stats" and CACHE:
        _patch_trampoline()
    config.pluginmanager.register(_Plugin(), "mutation-fixture-cache")


def pytest_runtest_logstart(nodeid, location):
    _call_seconds.setdefault(nodeid, 0.0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    t = time.perf_counter()
    yield
    _call_seconds[item.nodeid] = time.perf_counter() - t
    info = getattr(item, "_fixtureinfo", None)
    if info is not None:
        _closure[item.nodeid] = [(d[-1].baseid, d[-1].argname) for d in info.name2fixturedefs.values() if d]


def pytest_sessionfinish(session):
    if _mode() != "stats":
        return
    if COSTS:
        # a fixture kept for the mutants costs them (almost) nothing
        costs = {n: c + sum(_fixture_seconds.get(k, 0.0) for k in _closure.get(n, []) if "::".join(k) not in _entries)
                 for n, c in _call_seconds.items()}
        Path(COSTS).write_text(json.dumps(costs))
    if CACHE:
        hits = sorted(set().union(*_hits.values())) if _hits else []
        (Path(CACHE) / "index.json").write_text(json.dumps({"entries": _entries, "hits": hits}, indent=1))
'''


# --------------------------------------------------------------------------------------------
# the scratch copy
# --------------------------------------------------------------------------------------------
def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout


def make_base(rev: str | None, dest: Path) -> dict[str, Any]:
    """Copy the project into dest: `git archive REV`, or the working tree's tracked and
    untracked-but-not-ignored files.  Returns what was copied, for the report."""
    dest.mkdir(parents=True)
    if rev is not None:
        sha = _git("rev-parse", "--verify", f"{rev}^{{commit}}").strip()
        archive = dest.parent / "source.tar"
        with open(archive, "wb") as f:
            subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", sha], check=True, stdout=f)
        with tarfile.open(archive) as t:
            if hasattr(tarfile, "data_filter"):
                t.extractall(dest, filter="tar")
            else:
                t.extractall(dest)
        archive.unlink()
        return {"rev": rev, "commit": sha, "source": f"git archive {sha}"}
    head = _git("rev-parse", "HEAD").strip()
    files = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no").strip())
    return {"rev": None, "commit": head, "dirty": dirty,
            "source": "working tree (tracked and untracked-not-ignored files)"}


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def configure(scratch: Path, module: str, tests: list[str]) -> None:
    """Append mutmut's settings to the scratch copy's pyproject.toml (replacing any there)."""
    pyproject = scratch / "pyproject.toml"
    text = pyproject.read_text()
    text = re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", "", text)
    text += "\n[tool.mutmut]\n" + "\n".join([
        f"source_paths = {_toml_list(SOURCE_PATHS)}",
        f"only_mutate = {_toml_list([module])}",
        f"also_copy = {_toml_list(ALSO_COPY + ['sitecustomize.py', '_mutation_plugin.py'])}",
        f"pytest_add_cli_args_test_selection = {_toml_list(tests)}",
        f"pytest_add_cli_args = {_toml_list(['-m', MARKERS, '-p', 'no:cacheprovider', '-p', '_mutation_plugin'])}",
        # the tests import torch: every test run forks from a server that never ran a test
        'process_isolation = "forkserver"',
        f"timeout_constant = {TIMEOUT_CONSTANT}",
        f"timeout_multiplier = {TIMEOUT_MULTIPLIER}",
        "use_git_change_detection = false",
        "use_setproctitle = false",
    ]) + "\n"
    pyproject.write_text(text)
    (scratch / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    (scratch / "_mutation_plugin.py").write_text(_PLUGIN)
    (scratch / "fixture_cache").mkdir(exist_ok=True)
    (scratch / "_mutation_site").mkdir(exist_ok=True)
    (scratch / "_mutation_site" / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    (scratch / "tmp").mkdir(exist_ok=True)
    shared = REPO.parent / "shared"  # fixtures the tests look for beside the repository
    if shared.is_dir() and not (scratch / "shared").exists():
        (scratch / "shared").symlink_to(shared.resolve())


# --------------------------------------------------------------------------------------------
# running mutmut
# --------------------------------------------------------------------------------------------
def _mutmut() -> str:
    exe = Path(sys.executable).parent / "mutmut"
    if exe.exists():
        return str(exe)
    found = shutil.which("mutmut")
    if not found:
        sys.exit("mutmut is not installed in this environment: pip install mutmut==3.8.1")
    return found


def run_mutmut(scratch: Path, args: list[str], log: Path, nice: int) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MUTANT_UNDER_TEST", "PYTEST_"))}
    env.update({
        "PYTHONPATH": str(scratch / "_mutation_site"),
        "MUTATION_SUBPROCESS_HITS": str(scratch / "subprocess_hits.tsv"),
        "MUTATION_TEST_COSTS": str(scratch / "test_costs.json"),
        "MUTATION_FIXTURE_CACHE": str(scratch / "fixture_cache"),
        "TMPDIR": str(scratch / "tmp"),  # pytest's tmp_path folders and the stages' temp files
        "PYTHONDONTWRITEBYTECODE": "1",
    })

    def child_setup() -> None:
        if nice:
            os.nice(nice)

    with open(log, "ab") as out:
        out.write(f"\n$ mutmut {' '.join(args)}\n".encode())
        out.flush()
        proc = subprocess.Popen([_mutmut(), *args], cwd=scratch, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=child_setup)
        t0 = time.monotonic()
        try:
            rc = proc.wait()
            out.write(f"\n[exit {rc} after {time.monotonic() - t0:.0f} s]\n".encode())
            return rc
        except BaseException:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            # forked workers that outlived mutmut (they should not) go with its session
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def module_name(module: str) -> str:
    return module[:-3].replace("/", ".")


def _meta(scratch: Path, module: str) -> tuple[Path, dict[str, Any]]:
    path = scratch / "mutants" / (module + ".meta")
    return path, json.loads(path.read_text())


def merge_stats(scratch: Path, module: str) -> int:
    """Add the (test, function) pairs recorded in subprocesses to mutmut's stats, and replace
    its per-test durations by body + fixture setup (see _PLUGIN)."""
    stats_path = scratch / "mutants" / "mutmut-stats.json"
    stats = json.loads(stats_path.read_text())
    costs_file = scratch / "test_costs.json"
    if costs_file.exists():
        costs = json.loads(costs_file.read_text())
        for test in stats["duration_by_test"]:
            if test in costs:
                stats["duration_by_test"][test] = costs[test]
    hits_file = scratch / "subprocess_hits.tsv"
    if not hits_file.exists():
        stats_path.write_text(json.dumps(stats, indent=4))
        return 0
    known_tests = set(stats["duration_by_test"])
    prefix = module_name(module) + "."
    added = 0
    for line in hits_file.read_text().splitlines():
        test, _, func = line.partition("\t")
        test = test.removeprefix("mutants/")
        if test in known_tests and func.startswith(prefix):
            tests = stats["tests_by_mangled_function_name"].setdefault(func, [])
            if test not in tests:
                tests.append(test)
                added += 1
    stats_path.write_text(json.dumps(stats, indent=4))
    return added


def reset_results(scratch: Path, module: str) -> None:
    path, meta = _meta(scratch, module)
    meta["exit_code_by_key"] = {k: None for k in meta["exit_code_by_key"]}
    path.write_text(json.dumps(meta, indent=4))


# --------------------------------------------------------------------------------------------
# reading the results
# --------------------------------------------------------------------------------------------
def _function_spans(source: str) -> dict[tuple[str | None, str], tuple[int, int]]:
    """(class or None, function) -> (first line incl. decorators, last line), 1-based."""
    spans: dict[tuple[str | None, str], tuple[int, int]] = {}
    tree = ast.parse(source)
    for node in tree.body:
        items = [(None, node)] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else []
        if isinstance(node, ast.ClassDef):
            items = [(node.name, n) for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for cls, fn in items:
            start = min([fn.lineno] + [d.lineno for d in fn.decorator_list])
            spans[(cls, fn.name)] = (start, fn.end_lineno or fn.lineno)
    return spans


def describe_mutant(scratch: Path, module: str, name: str, source_lines: list[str],
                    spans: dict[tuple[str | None, str], tuple[int, int]]) -> dict[str, Any]:
    """Function, line, original and mutated text and the function diff of one mutant."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant, read_functions_from_index
    from mutmut.utils.format_utils import orig_function_and_class_names_from_key

    import libcst as cst

    func, cls = orig_function_and_class_names_from_key(name)
    cwd = os.getcwd()
    os.chdir(scratch)
    try:
        diff = get_diff_for_mutant(name, path=module)
        functions = read_functions_from_index(name, module)
        if functions is None:
            from mutmut.mutation.diff_apply import read_mutant_function, read_mutants_module, read_original_function

            mod = read_mutants_module(module)
            functions = (read_original_function(mod, name), read_mutant_function(mod, name))
        orig_code, mut_code = (cst.Module([f]).code.strip("\n") for f in functions)
    finally:
        os.chdir(cwd)
    a, b = orig_code.split("\n"), mut_code.split("\n")
    ops = [op for op in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes() if op[0] != "equal"]
    _, i1, i2, j1, j2 = ops[0] if ops else ("equal", 0, 0, 0, 0)
    original = "\n".join(x.strip() for x in a[i1:i2])
    mutated = "\n".join(x.strip() for x in b[j1:j2])
    # Place the first changed line in the source file: match the function's lines (stripped)
    # inside its span, so the relative offset inside the diff gives the absolute line.
    line = None
    start, end = spans.get((cls, func), (1, len(source_lines)))
    stripped_file = [x.strip() for x in source_lines]
    stripped_a = [x.strip() for x in a]
    for s in range(max(0, start - 1 - 20), end):
        if stripped_file[s:s + len(stripped_a)] == stripped_a:
            line = s + 1 + i1
            break
    if line is None and original:  # fall back to the first line of the span with that text
        first = original.split("\n")[0]
        line = next((k + 1 for k in range(start - 1, end) if stripped_file[k] == first), None)
    return {
        "mutant": name,
        "module": module,
        "function": f"{cls}.{func}" if cls else func,
        "line": line,
        "original": original,
        "mutated": mutated,
        "diff": diff,
    }


def _norm(text: str | None) -> str:
    return re.sub(r"\s+", " ", (text or "").strip())


def load_equivalent(path: Path | None) -> list[dict[str, Any]]:
    """The entries of one file, or of every *.yaml/*.yml/*.json file in a folder."""
    if path is None:
        return []
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix in (".yaml", ".yml", ".json"))
        return [e for f in files for e in load_equivalent(f)]
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or []
    else:
        data = json.loads(text)
    if isinstance(data, dict):
        data = data.get("equivalent", [])
    for i, e in enumerate(data):
        missing = {"module", "mutation", "reason"} - set(e)
        if missing:
            sys.exit(f"{path}: entry {i} lacks {sorted(missing)} (needs module, line, mutation, reason)")
    return data


def match_equivalent(entries: list[dict[str, Any]], module: str, described: list[dict[str, Any]]) -> dict[str, dict]:
    """mutant name -> equivalent entry.  An entry matches a mutant of the same module whose
    mutated text (and original text, when the entry gives it) is the same, whitespace aside;
    of several such mutants, the one on the entry's line (or, failing that, the only one)."""
    out: dict[str, dict] = {}
    for e in entries:
        if e["module"] != module:
            continue
        cands = [d for d in described if _norm(d["mutated"]) == _norm(e["mutation"])
                 and ("original" not in e or _norm(d["original"]) == _norm(e["original"]))]
        on_line = [d for d in cands if d["line"] == e.get("line")]
        chosen = on_line or (cands if len(cands) == 1 else [])
        for d in chosen:
            out[d["mutant"]] = e
        e["_matched"] = e.get("_matched", 0) + len(chosen)
    return out


def collect(scratch: Path, module: str, tests: list[str], wall: float,
            equivalent: list[dict[str, Any]]) -> dict[str, Any]:
    _, meta = _meta(scratch, module)
    stats = json.loads((scratch / "mutants" / "mutmut-stats.json").read_text())
    prefix = module_name(module) + "."
    reaching = sorted({t for f, ts in stats["tests_by_mangled_function_name"].items() if f.startswith(prefix)
                       for t in ts})
    status = {k: STATUS.get(v, "suspicious" if v not in (-11, -9) else "segfault")
              for k, v in meta["exit_code_by_key"].items()}
    counts = {c: 0 for c in COUNTED}
    for s in status.values():
        counts[s] += 1
    source = (scratch / module).read_text()
    lines, spans = source.split("\n"), _function_spans(source)
    not_killed = [k for k, s in status.items() if s not in ("killed", "caught_by_type_check")]
    described = [{**describe_mutant(scratch, module, k, lines, spans), "status": status[k]}
                 for k in sorted(not_killed, key=_mutant_order)]
    described.sort(key=lambda d: (d["line"] or 0, _mutant_order(d["mutant"])))
    eq = match_equivalent(equivalent, module, described)
    n = len(status)
    n_eq = len(eq)
    denom = n - n_eq
    res: dict[str, Any] = {
        "tests": tests,
        "tests_reaching": sorted({t.split("::")[0] for t in reaching}),
        "tests_reaching_count": len(reaching),
        "mutants": n,
        **counts,
        "equivalent": n_eq,
        "score": round(counts["killed"] / denom, 4) if denom else None,
        "score_counting_timeouts": round((counts["killed"] + counts["timeout"]) / denom, 4) if denom else None,
        "wall_seconds": round(wall, 1),
        "survivors": [d for d in described if d["mutant"] not in eq and d["status"] in ("survived", "no_tests")],
        "timeouts": [d for d in described if d["mutant"] not in eq and d["status"] == "timeout"],
        "other": [d for d in described if d["mutant"] not in eq and d["status"] not in ("survived", "no_tests", "timeout")],
        "equivalent_mutants": [{**d, "reason": eq[d["mutant"]]["reason"]} for d in described if d["mutant"] in eq],
    }
    return res


def _mutant_order(name: str) -> tuple[str, int]:
    base, _, num = name.rpartition("__mutmut_")
    return base, int(num) if num.isdigit() else 0


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    src = report["source"]
    rows = ["| module | mutants | killed | survived | no tests | timeout | equivalent | score | wall (s) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, r in report["modules"].items():
        score = f"{r['score']:.1%}" if r["score"] is not None else "-"
        rows.append(f"| `{m}` | {r['mutants']} | {r['killed']} | {r['survived']} | {r['no_tests']} | "
                    f"{r['timeout']} | {r['equivalent']} | {score} | {r['wall_seconds']:.0f} |")
    t = report["totals"]
    score = f"{t['score']:.1%}" if t["score"] is not None else "-"
    rows.append(f"| **all** | {t['mutants']} | {t['killed']} | {t['survived']} | {t['no_tests']} | "
                f"{t['timeout']} | {t['equivalent']} | {score} | {report['wall_seconds']:.0f} |")
    head = [f"# Mutation testing: {src.get('commit', '?')[:12]}",
            "",
            f"{report['tool']} on {report['machine']['cpus']} CPUs, {report['jobs']} workers, "
            f"{report['started']}; source: {src['source']}{' (dirty)' if src.get('dirty') else ''}.",
            "score = killed / (mutants - equivalent); the full list of surviving mutants, with "
            "their diffs, is in the JSON next to this file.",
            ""]
    return "\n".join(head + rows) + "\n"


def write_report(report: dict[str, Any], out: Path, md: Path | None, equivalent: list[dict[str, Any]],
                 t_all: float, complete: bool) -> None:
    """Totals, then the JSON (and markdown); written after each module, so a stopped run
    leaves the modules it finished (with "complete": false)."""
    report["complete"] = complete
    report["wall_seconds"] = round(time.monotonic() - t_all, 1)
    mods = report["modules"].values()
    tot = {c: sum(r[c] for r in mods) for c in ["mutants", *COUNTED, "equivalent"]}
    denom = tot["mutants"] - tot["equivalent"]
    tot["score"] = round(tot["killed"] / denom, 4) if denom else None
    tot["score_counting_timeouts"] = round((tot["killed"] + tot["timeout"]) / denom, 4) if denom else None
    report["totals"] = tot
    report["equivalent_unmatched"] = [{k: v for k, v in e.items() if k != "_matched"} for e in equivalent
                                      if e["module"] in report["modules"] and not e.get("_matched")]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if md:
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modules", nargs="+", metavar="PATH", help="a subset of: " + ", ".join(MODULES))
    p.add_argument("--rev", help="git revision to test (default: the working tree)")
    p.add_argument("--jobs", type=int, default=2, help="parallel mutant workers (default 2)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "mutation.json")
    p.add_argument("--md", type=Path, help="also write a markdown table here")
    p.add_argument("--equivalent", type=Path, help="JSON or YAML list of equivalent mutants to leave out of the score, or a folder of such files")
    p.add_argument("--all-tests", action="store_true", help="give mutmut every fast test instead of the module's list")
    p.add_argument("--nice", type=int, default=10, help="niceness of the mutmut processes (default 10; 0: none)")
    p.add_argument("--workdir", type=Path, help="scratch folder (default: a new temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (its path is printed)")
    a = p.parse_args(argv)

    def stop(signum: int, frame: Any) -> None:  # `kill` ends the mutmut processes too
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)

    modules = a.modules or list(MODULES)
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        p.error(f"unknown module(s) {unknown}; known: {list(MODULES)}")
    equivalent = load_equivalent(a.equivalent)
    import mutmut  # noqa: F401  (fail early when it is missing)
    from importlib.metadata import version

    work = Path(tempfile.mkdtemp(prefix="trtpipe-mutation-", dir=a.workdir))
    keep = a.keep or a.workdir is not None
    t_all = time.monotonic()
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    report: dict[str, Any] = {
        "tool": f"mutmut {version('mutmut')}",
        "command": " ".join([Path(sys.argv[0]).name if argv is None else "bench/mutation.py", *(sys.argv[1:] if argv is None else argv)]),
        "started": started,
        "jobs": a.jobs,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "markers": MARKERS,
        "all_tests": a.all_tests,
        "equivalent_file": str(a.equivalent) if a.equivalent else None,
        "modules": {},
    }
    try:
        base = work / "base"
        report["source"] = make_base(a.rev, base)
        print(f"scratch: {work}  ({report['source']['source']})", flush=True)
        for module in modules:
            tests = ["tests"] if a.all_tests else MODULES[module]
            missing = [t for t in tests if not (base / t).exists()]
            if missing:
                sys.exit(f"{module}: test files not in the copied revision: {missing}")
            if not (base / module).exists():
                sys.exit(f"{module}: not in the copied revision")
            scratch = work / module.replace("/", "__")
            shutil.copytree(base, scratch, symlinks=True)
            configure(scratch, module, tests)
            log = scratch / "mutmut.log"
            t0 = time.monotonic()
            print(f"{module}: {len(tests)} test file(s) ...", flush=True)
            # Pass 1: generate the mutants and record which test reaches which function (running
            # only each function's first mutant); then add what subprocesses recorded.
            rc = run_mutmut(scratch, ["run", "--max-children", str(a.jobs), f"{module_name(module)}.*__mutmut_1"], log, a.nice)
            if rc != 0:
                raise RuntimeError(f"{module}: mutmut's first pass failed (exit {rc}); see {log}")
            added = merge_stats(scratch, module)
            reset_results(scratch, module)
            # Pass 2: every mutant.
            rc = run_mutmut(scratch, ["run", "--max-children", str(a.jobs)], log, a.nice)
            if rc != 0:
                raise RuntimeError(f"{module}: mutmut run failed (exit {rc}); see {log}")
            wall = time.monotonic() - t0
            res = collect(scratch, module, tests, wall, equivalent)
            res["tests_added_from_subprocesses"] = added
            report["modules"][module] = res
            write_report(report, a.out, a.md, equivalent, t_all, complete=False)
            print(f"{module}: {res['mutants']} mutants, {res['killed']} killed, {res['survived']} survived, "
                  f"{res['no_tests']} no tests, {res['timeout']} timeout, score {res['score']}, {wall:.0f} s", flush=True)
            if not keep:
                shutil.rmtree(scratch, ignore_errors=True)
    finally:
        if keep:
            print(f"kept scratch folder {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    write_report(report, a.out, a.md, equivalent, t_all, complete=True)
    print(f"wrote {a.out}" + (f" and {a.md}" if a.md else ""))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
