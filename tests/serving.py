"""The real MONAI Label server for the tests: started as a user starts it, stopped with all it
started (training subprocesses), and checked to leave nothing behind."""

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import psutil
import pytest
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# MONAI Label runs every scoring method in a subprocess at start-up and after each training and
# next_sample; test servers run without it, so that it never competes with the requests a test
# makes or measures (the scoring test starts it itself)
NO_AUTO_SCORING = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(args, log_path: str, env: dict | None = None, timeout: float = 180):
    """Start ``python <args> --host 127.0.0.1 --port <free>`` in its own process group from the
    repository root (CPU only, also where CUDA is available), wait for ``/info/``, and yield
    ``(url, process)``. Afterwards stop the group and assert that no process is left."""
    port = free_port()
    cmd = [sys.executable, *args, "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        try:
            if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            log.close()
            pytest.fail(f"server did not start (rc {proc.poll()}):\n{open(log_path).read()[-4000:]}")
        time.sleep(0.5)
    try:
        yield url, proc
    finally:
        family = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)] if proc.poll() is None else [proc.pid]
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
        time.sleep(0.5)
        alive = [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert alive == [], f"processes left behind: {alive}"
