"""Guarded subprocesses of the side-by-side benchmarks (``compare_reference.py``, ``bench_peers.py``): a wall-time
and a resident-memory limit, the result file read back, and the environment of this library's side. NumPy only."""
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent


@dataclass
class RunOutcome:
    """What a guarded subprocess produced.

    Attributes
    ----------
    status
        ``"ok"``, ``"failed"``, ``"timeout"`` or ``"memory"`` (killed by the RSS guard).
    seconds
        Wall time of the whole subprocess (interpreter start and imports included).
    results
        Arrays read from the subprocess' output file (empty unless ``status == "ok"``).
    message
        Tail of the subprocess' output when it did not succeed.
    """

    status: str
    seconds: float
    results: Dict[str, np.ndarray] = field(default_factory=dict)
    message: str = ""

    @property
    def ok(self) -> bool:
        """Whether the run succeeded and produced results.

        Returns
        -------
        bool
            ``status == "ok"``.
        """
        return self.status == "ok"


def process_rss_mib(pid: int) -> float:
    """Current resident set size of a process, read from ``/proc``.

    Parameters
    ----------
    pid
        Process id.

    Returns
    -------
    float
        ``VmRSS`` in MiB, or 0 when it cannot be read (process gone, not Linux).
    """
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return 0.0


def run_guarded(command: List[str], env: Dict[str, str], output: Path, limits: Tuple[float, float]) -> RunOutcome:
    """Run a command, killing it when it exceeds a wall-time or resident-memory limit.

    Parameters
    ----------
    command
        The command line.
    env
        Its environment.
    output
        The ``.npz`` file the command writes on success.
    limits
        Wall-time limit in seconds and resident-memory limit in MiB (polled every 50 ms).

    Returns
    -------
    RunOutcome
        Status, duration, results and error message.
    """
    start, status = time.perf_counter(), ""
    with tempfile.TemporaryFile() as log, subprocess.Popen(command, env=env, cwd=str(BENCH_DIR), stdout=log,
                                                           stderr=subprocess.STDOUT) as process:
        while process.poll() is None and not status:
            if time.perf_counter() - start > limits[0]:
                status = "timeout"
            elif process_rss_mib(process.pid) > limits[1]:
                status = "memory"
            else:
                time.sleep(0.05)
        if status:
            process.kill()
            process.wait()
        seconds = time.perf_counter() - start
        log.seek(0)
        text = log.read().decode("utf-8", errors="replace")
    status = status or ("ok" if process.returncode == 0 and output.exists() else "failed")
    if status != "ok":
        noise = ("I0000", "W0000", "E0000", "WARNING: All log messages")
        lines = [line for line in text.splitlines() if line.strip() and not line.startswith(noise)]
        reason = {"timeout": f"killed after {limits[0]:.0f} s", "memory": f"killed above {limits[1]:.0f} MiB RSS"}
        return RunOutcome(status=status, seconds=seconds,
                          message="\n".join(lines[-15:] + [reason.get(status, f"exit status {process.returncode}")]))
    with np.load(output) as archive:
        return RunOutcome(status=status, seconds=seconds, results={key: archive[key] for key in archive.files})


def run_reported(command: List[str], env: Dict[str, str], output: Path, limits: Tuple[float, float]) -> RunOutcome:
    """:func:`run_guarded`, then print the status and duration (ending the caller's progress line) and, when the run
    did not succeed, the tail of its output."""
    outcome = run_guarded(command, env, output, limits)
    print(f"{outcome.status} in {outcome.seconds:.1f} s")
    if not outcome.ok:
        print("    " + outcome.message.replace("\n", "\n    "))
    return outcome


def ours_env() -> Dict[str, str]:
    """Environment for processes running this library (Keras 3).

    Returns
    -------
    dict
        ``os.environ`` without ``TF_USE_LEGACY_KERAS`` and with the repository root first on
        ``PYTHONPATH`` (so the working tree is used even when the package is not installed).
    """
    env = dict(os.environ)
    env.pop("TF_USE_LEGACY_KERAS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env
