"""Runs a script as two CPU processes under torchrun (gloo), as the multi-process tests do.

A run that does not finish within the timeout is asked for its Python stacks before it is killed: every
process runs with faulthandler on, so SIGABRT makes each worker print where all its threads are. The test then
fails with those stacks instead of a bare timeout, which is what a rare hang needs to be diagnosed. torchrun
starts each worker in a session of its own, so the workers are found as its descendants in /proc (Linux), and
torchrun is paused meanwhile, since after one worker's failure it would stop the others before they print.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def run_two_processes(script: Path, args: list[str], port: int, cwd: Path, timeout: float = 600,
                      **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(script), *args]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", **env)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                               env=environment)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        workers = _descendants(process.pid)
        _send([process.pid], signal.SIGSTOP)  # so that torchrun does not stop the other workers after the first
        for worker in workers:  # one at a time: their stacks share one pipe
            _send([worker], signal.SIGABRT)
            time.sleep(2)
        _send([process.pid, *workers, *_descendants(process.pid)], signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{script.name} under torchrun did not finish in {timeout:.0f} s; its stacks and output:\n"
                    f"--- stderr (last 12000 characters)\n{stderr[-12000:]}\n--- stdout (last 3000)\n{stdout[-3000:]}")
    assert process.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # the process has just exited
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (name)": state, then the parent's pid
            children.setdefault(parent, []).append(int(entry.name))
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def _send(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
