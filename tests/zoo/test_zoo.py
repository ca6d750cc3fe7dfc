"""Every method of the library on every model of the zoo, against brute-force ground truths.

One subprocess per model (``zoo_case.py``) runs all the methods of that model and prints one JSON result per
method; the tests, parametrized over (model, method), read the cached results of their model. A crash of the
process (segfault, abort, timeout) fails the method it was running, with its return code and the last lines of its
standard error; the methods after it run in a fresh process.

Pairs listed in ``NOT_APPLICABLE`` check that the library refuses them with a ``ValueError``; pairs listed in
``KNOWN_FAILURES`` are ``xfail(strict=True)``. Both lists are shown on ``docs/models.md`` (checked below).
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from tests.zoo.zoo_models import KNOWN_FAILURES, METHODS, MODEL_NAMES, NOT_APPLICABLE, support_matrix

ROOT = Path(__file__).resolve().parents[2]
CASE_SCRIPT = Path(__file__).resolve().with_name("zoo_case.py")
TIMEOUT_S = 240  # per process (one model): a hang fails the method that was running
STDERR_LINES = 25

_RESULTS: Dict[str, Dict[str, Dict[str, Any]]] = {}


def _text(stream: Any) -> str:
    if stream is None:
        return ""
    return stream.decode("utf-8", "replace") if isinstance(stream, bytes) else stream


def _run_process(model: str, methods: List[str]) -> Dict[str, Any]:
    """Run ``zoo_case.py model methods...``: its parsed results, the method it was running when it stopped, its
    return code (None on timeout) and its standard error."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OPENBLAS_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    command = [sys.executable, str(CASE_SCRIPT), model, *methods]
    try:
        process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
                                 check=False)
        stdout, stderr, returncode = process.stdout, process.stderr, process.returncode
    except subprocess.TimeoutExpired as expired:
        stdout, stderr, returncode = _text(expired.stdout), _text(expired.stderr), None
    results, running = {}, None
    for line in stdout.splitlines():
        if line.startswith("ZOO-START "):
            running = line.split(" ", 1)[1].strip()
        elif line.startswith("ZOO-RESULT "):
            result = json.loads(line[len("ZOO-RESULT "):])
            results[result["method"]] = result
            running = None
    return {"results": results, "running": running, "returncode": returncode, "stderr": stderr}


def model_results(model: str) -> Dict[str, Dict[str, Any]]:
    """Results of every method on ``model`` (run once per test session)."""
    if model in _RESULTS:
        return _RESULTS[model]
    results: Dict[str, Dict[str, Any]] = {}
    remaining = list(METHODS)
    while remaining:
        run = _run_process(model, remaining)
        results.update(run["results"])
        remaining = [method for method in remaining if method not in results]
        if not remaining:
            break
        tail = "\n".join(run["stderr"].splitlines()[-STDERR_LINES:])
        how = f"timed out after {TIMEOUT_S} s" if run["returncode"] is None else \
            f"exited with return code {run['returncode']}"
        crashed = run["running"] or remaining[0]
        stopped = [crashed] if run["running"] else list(remaining)  # before any method: setup failed for all
        for method in stopped:
            results[method] = {"crash": f"the process running {model} {how} while running {crashed}; last lines "
                                        f"of its standard error:\n{tail}"}
        remaining = [method for method in remaining if method not in results]
    _RESULTS[model] = results
    return results


def _failed_checks(result: Dict[str, Any]) -> List[str]:
    failures = []
    for check in result["checks"]:
        if check["problem"] is not None:
            failures.append(f"{check['name']}: {check['problem']}")
        elif not check["error"] <= check["tol"] * max(check["scale"], 1e-12):
            failures.append(f"{check['name']}: max |error| {check['error']:.3e} > {check['tol']:.0e} × max "
                            f"|expected| {check['scale']:.3e}")
    return failures


def _cases() -> List[Any]:
    cases = []
    for model in MODEL_NAMES:
        for method in METHODS:
            marks = []
            if (model, method) in KNOWN_FAILURES:
                marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[(model, method)]))
            cases.append(pytest.param(model, method, id=f"{model}-{method}", marks=marks))
    return cases


@pytest.mark.parametrize("model,method", _cases())
def test_method_on_model(model: str, method: str) -> None:
    """The method runs on the model and matches the ground truth (or, where it does not apply, refuses it)."""
    result = model_results(model)[method]
    if "crash" in result:
        pytest.fail(result["crash"], pytrace=False)
    if result["error"] is not None:
        pytest.fail(f"{method} on {model} raised {result['error']}\n{result['traceback']}", pytrace=False)
    if result["not_applicable"]:
        reason: Optional[str] = NOT_APPLICABLE[(model, method)]
        assert result["raised"].startswith("ValueError"), f"{method} should refuse {model} ({reason}): " \
                                                          f"{result['raised']}"
        return
    assert result["checks"], "no value was checked"
    failures = _failed_checks(result)
    assert not failures, f"{method} on {model}:\n" + "\n".join(failures)


def test_docs_page_shows_the_support_matrix() -> None:
    """docs/models.md holds the matrix generated from NOT_APPLICABLE and KNOWN_FAILURES (regenerate it with
    ``python -m tests.zoo.zoo_models``)."""
    page = (ROOT / "docs" / "models.md").read_text(encoding="utf-8")
    begin, end = "<!-- zoo-matrix -->", "<!-- /zoo-matrix -->"
    assert begin in page and end in page, "docs/models.md lost its zoo-matrix markers"
    shown = page.split(begin, 1)[1].split(end, 1)[0].strip()
    assert shown == support_matrix().strip(), "docs/models.md is out of date: run python -m tests.zoo.zoo_models"


FAKE_CASE = '''
import json, os, signal, sys
for method in sys.argv[2:]:
    print("ZOO-START " + method, flush=True)
    if method == "tracin":
        print("fake crash in tracin", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSEGV)
    print("ZOO-RESULT " + json.dumps({"method": method, "error": None, "checks": []}), flush=True)
'''


def test_a_crash_fails_only_the_method_it_happened_in(tmp_path, monkeypatch):
    """A process killed by a signal while running one method: that method reports the signal and the end of the
    standard error; the methods before and after it still get their results (the latter from a new process)."""
    script = tmp_path / "fake_case.py"
    script.write_text(FAKE_CASE, encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "CASE_SCRIPT", script)
    monkeypatch.setattr(sys.modules[__name__], "_RESULTS", {})
    results = model_results("fake")
    assert set(results) == set(METHODS)
    assert "crash" in results["tracin"] and "-11" in results["tracin"]["crash"]
    assert "fake crash in tracin" in results["tracin"]["crash"]
    assert all("crash" not in results[method] for method in METHODS if method != "tracin")
