"""`returns-serve` as a process over a real TorchServe: stopped by a signal it exits 0; when TorchServe
dies by itself after it was ready it exits 3, says so and where the logs are; nothing is left running."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripts.localserve import EXIT_TORCHSERVE_EXITED, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def start(model_root: Path, cwd: Path) -> tuple[subprocess.Popen, dict]:
    """returns-serve in ``cwd`` (its logs go to ``cwd/logs/torchserve``), and its ready line."""
    cmd = [str(Path(sys.executable).parent / "returns-serve"), "--model-root", str(model_root),
           "--port", str(free_port())]
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # returns-serve gives up by itself within 180 s
    if not line:
        proc.wait(timeout=60)
        pytest.fail(f"returns-serve exited {proc.returncode} before it was ready: {proc.stderr.read()[-3000:]}")
    return proc, json.loads(line)


def torchserve_processes(proc: subprocess.Popen) -> list:
    import psutil

    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def gone(processes: list, timeout: float = 30) -> bool:
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return not alive


def test_a_signal_stops_it_with_exit_0(model_root, tmp_path):
    proc, ready = start(model_root, tmp_path)
    try:
        assert ready["ready"] is True
        children = torchserve_processes(proc)
        assert children
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, proc.stderr.read()[-3000:]
        assert gone(children)
    finally:
        proc.kill()


def test_torchserve_dying_by_itself_is_exit_3_with_where_its_logs_are(model_root, tmp_path):
    proc, ready = start(model_root, tmp_path)
    try:
        children = torchserve_processes(proc)
        java = [p for p in children if "java" in " ".join(p.cmdline())]
        assert len(java) == 1, [p.cmdline() for p in children]
        java[0].kill()  # the frontend, as the kernel's OOM killer would
        t0 = time.monotonic()
        assert proc.wait(timeout=90) == EXIT_TORCHSERVE_EXITED
        assert time.monotonic() - t0 < 60
        err = proc.stderr.read()
        logs = tmp_path / "logs" / "torchserve" / "logs"
        assert ready["logs"] == str(logs)
        assert err.startswith(f"returns-serve: TorchServe exited by itself after it was ready; its logs are in {logs}")
        assert gone(children)  # the workers the frontend started are stopped too
    finally:
        proc.kill()
