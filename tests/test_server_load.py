"""The MONAI Label server under load: concurrent infers, many infers in a row, infers while a
training runs, and a second training request while one runs.

One real server (the README's command, CPU-sized bundle overrides, only the BraTS bundle), driven
with MONAI Label's own client. A freshly initialised network is put in place as the trained
checkpoint before the server starts, so that infers work from the first request. Every test
stands on its own: the ones that train save the labels they need and wait for their training to
end, and the ones that compare results compare within one checkpoint.
"""

import concurrent.futures
import datetime
import json
import os
import re
import sys
import time

import itk
import numpy as np
import psutil
import pytest
import requests
import torch
from monailabel.client import MONAILabelClient

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)  # the helpers and settings of the server tests that drive every option
from serving import NO_AUTO_SCORING, running_server  # noqa: E402
from test_monailabel_app import (  # noqa: E402
    MODEL, OVERRIDES, README_COMMAND, SLICER, _bundle_config, _error, _save_labels, _sha, write_brats_studies,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHEAP = {"spacing_policy": "target", "target_spacing": "3", **SLICER}  # the cheapest request: 16 x 16 x 11 voxels here
TRAIN = {"max_epochs": 3, "val_interval": 1, "train_batch_size": 2}
LOADED = "Loaded checkpoint "


def _write_checkpoint(model_dir: str) -> str:
    """A freshly initialised network of the bundle, with the served overrides and built as the app
    builds it, saved as ``{"model": state_dict}`` where ``--conf model_dir`` makes the app look."""
    config = _bundle_config(model_dir)
    torch.manual_seed(0)
    torch.save({"model": config.build_network("cpu").state_dict()}, config.path)
    return config.path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("load"))
    studies, labels = write_brats_studies(root)
    model_dir = os.path.join(root, "models")
    os.makedirs(model_dir)
    checkpoint = _write_checkpoint(model_dir)
    args = [*README_COMMAND.replace("/path/to/images", studies).replace("models all", f"models {MODEL}").split()[1:],
            "--conf", "model_dir", model_dir, "--conf", "bundle_overrides", json.dumps(OVERRIDES)]
    log_path = os.path.join(root, "server.log")
    with running_server(args, log_path, env=NO_AUTO_SCORING) as (url, proc):
        results = os.path.join(root, "results")
        os.makedirs(results)
        yield {"client": MONAILabelClient(url, tmpdir=results), "url": url, "root": root, "studies": studies, "labels": labels,
               "checkpoint": checkpoint, "proc": proc, "log": log_path}


def _label(client: MONAILabelClient, image: str, params: dict) -> np.ndarray:
    """The voxels of the label the server returns (the result file is removed after reading)."""
    result, _ = client.infer(MODEL, image, dict(params))  # a copy: the client adds its client_id to the dict
    try:
        return itk.array_from_image(itk.imread(result))
    finally:
        os.remove(result)


def _train_status(client: MONAILabelClient) -> dict:
    """The latest train task, ``{}`` before the first (MONAI Label answers 404 then)."""
    reply = requests.get(f"{client._server_url}/train/", timeout=60)
    return reply.json() if reply.status_code == 200 else {}


def _wait_until_not_running(client: MONAILabelClient, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = _train_status(client)
        if status.get("status") not in ("SUBMITTED", "RUNNING"):
            return status
        time.sleep(0.5)
    raise AssertionError(f"training did not finish in {timeout} s: {status}")


def _rss(pid: int) -> int:
    """Resident memory (bytes) of a process and all its children."""
    family = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    total = 0
    for p in family:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _last_load_time(log_path: str, checkpoint: str) -> float:
    """When the server last logged loading ``checkpoint`` (epoch seconds, from the log's timestamp)."""
    stamps = re.findall(r"^\[([\d-]+ [\d:]+,\d+)\][^\n]*" + re.escape(f"{LOADED}{checkpoint} "), open(log_path).read(), re.M)
    assert stamps, f"no '{LOADED}{checkpoint}' in the server log"
    return datetime.datetime.strptime(stamps[-1], "%Y-%m-%d %H:%M:%S,%f").timestamp()


# --- many requests at once, many in a row ---------------------------------------------------------

def test_concurrent_infers_return_the_sequential_labels(server):
    """4 client threads x 5 requests in flight together give, voxel for voxel, the labels of the
    same requests made one after another."""
    requests_ = [(f"case{i % 3}", {"spacing_policy": "native", **SLICER} if i % 2 else {**CHEAP, "target_spacing": "2,2,2"})
                 for i in range(20)]
    distinct = {(image, json.dumps(params, sort_keys=True)): None for image, params in requests_}
    client = server["client"]
    for image, params in distinct:
        distinct[(image, params)] = _label(client, image, json.loads(params))
    assert any(label.any() for label in distinct.values()) and any((label == 0).any() for label in distinct.values())

    def one_thread(t: int) -> list:
        # one client per thread, as four Slicer instances would be
        mine = MONAILabelClient(server["url"], tmpdir=os.path.join(server["root"], f"results{t}"))
        os.makedirs(mine._tmpdir, exist_ok=True)
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            return list(pool.map(lambda r: (r, _label(mine, *r)), requests_[t::4]))

    started = time.time()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = [a for thread in pool.map(one_thread, range(4)) for a in thread]
    print(f"20 concurrent infers in {time.time() - started:.1f} s")
    assert len(answers) == 20
    for (image, params), label in answers:
        expected = distinct[(image, json.dumps(params, sort_keys=True))]
        assert label.shape == expected.shape and np.array_equal(label, expected), (image, params, int((label != expected).sum()))


def test_many_infers_do_not_grow_the_server_memory(server):
    """100 cheap infers in a row: the server's resident memory (with its children) grows by at most
    10 % from after the first 10 (warm-up) to the end."""
    client, pid = server["client"], server["proc"].pid
    times = []
    for i in range(100):
        if i == 10:
            warm = _rss(pid)
        started = time.time()
        _label(client, f"case{i % 3}", CHEAP)
        times.append(time.time() - started)
    end = _rss(pid)
    growth = end / warm - 1
    print(f"100 infers: {np.median(times):.3f} s median each; RSS {warm / 2**20:.0f} MiB after 10, {end / 2**20:.0f} MiB after 100 "
          f"({100 * growth:+.1f} %)")
    assert growth <= 0.10, f"resident memory grew {100 * growth:.1f} % ({warm / 2**20:.0f} -> {end / 2**20:.0f} MiB)"


# --- training while serving ---------------------------------------------------------------------

def test_infers_are_answered_while_training_runs_and_then_use_the_new_checkpoint(server):
    client, checkpoint = server["client"], server["checkpoint"]
    _save_labels(server)
    _wait_until_not_running(client)
    before = _label(client, "case0", CHEAP)
    sha = _sha(checkpoint)
    client.train_start(MODEL, TRAIN)
    answered_while_running = 0
    deadline = time.time() + 300
    while time.time() < deadline:
        status = client.train_status()["status"]
        if status not in ("SUBMITTED", "RUNNING"):
            break
        label = _label(client, "case0", CHEAP)  # raises unless 200
        assert label.shape == before.shape
        if status == "RUNNING" and client.train_status()["status"] == "RUNNING":
            answered_while_running += 1
        time.sleep(0.5)  # a user's pace, and CPU left for the training
    done = client.train_status()
    assert done["status"] == "DONE", "\n".join(done.get("details", []))
    assert answered_while_running >= 2, answered_while_running
    # the training replaced the served checkpoint; the next request runs with the final one
    assert _sha(checkpoint) != sha
    written = os.path.getmtime(checkpoint)
    after = _label(client, "case0", CHEAP)
    assert _last_load_time(server["log"], checkpoint) >= written - 1e-3
    assert (after != before).any()
    print(f"{answered_while_running} infers answered while training ran; "
          f"{int((after != before).sum())} voxels of case0 changed after training")


def _task(server, task_id: str) -> dict:
    tasks = requests.get(f"{server['url']}/train/", params={"all": "true"}, timeout=60).json()
    return next(t for t in tasks if t["id"] == task_id)


def _wait_for(server, task_id: str, done: bool, timeout: float = 300) -> dict:
    """The task once it has ended (``done``) or once its subprocess runs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        task = _task(server, task_id)
        if (task["status"] not in ("SUBMITTED", "RUNNING")) if done else task["status"] != "SUBMITTED":
            return task
        time.sleep(0.2)
    raise AssertionError(f"task {task_id} still {task['status']} after {timeout} s")


def test_a_second_training_request_while_one_runs_gets_a_409(server):
    """The second request is refused with what runs and what to do, the first training ends DONE;
    ``?enqueue=true`` queues one on purpose, and once nothing runs, training is accepted again."""
    client = server["client"]
    _save_labels(server)
    _wait_until_not_running(client)
    first = client.train_start(MODEL, {**TRAIN, "max_epochs": 1})
    # at once (MONAI Label may not have started its subprocess yet) and once it runs
    status, msg = _error(client.train_start, MODEL, TRAIN)
    assert status == 409 and f"training of {MODEL} is already " in msg and "DELETE /train/" in msg, msg
    assert _wait_for(server, first["id"], done=False)["status"] == "RUNNING"
    status, msg = _error(client.train_start, MODEL, TRAIN)
    assert status == 409 and f"training of {MODEL} is already running (started {first['start_ts']}, task {first['id']})" in msg, msg
    queued = requests.post(f"{server['url']}/train/{MODEL}", params={"enqueue": "true"}, json=TRAIN, timeout=60)
    assert queued.status_code == 200 and queued.json()["status"] == "SUBMITTED", queued.text
    queued = queued.json()
    ended = _wait_for(server, first["id"], done=True)
    assert ended["status"] == "DONE", "\n".join(ended.get("details", []))
    # the queued one starts after it; stopped, as the 409 says
    assert _wait_for(server, queued["id"], done=False)["status"] == "RUNNING"
    stopped = client.train_stop()
    assert stopped["id"] == queued["id"] and stopped["status"] == "STOPPED"
    tasks = requests.get(f"{server['url']}/train/", params={"all": "true"}, timeout=60).json()
    assert [t["id"] for t in tasks if t["start_ts"] >= first["start_ts"]] == [first["id"], queued["id"]], tasks
    # nothing runs now: a plain request is accepted again
    again = client.train_start(MODEL, {**TRAIN, "max_epochs": 1})
    assert _wait_for(server, again["id"], done=False)["status"] == "RUNNING"
    assert client.train_stop()["id"] == again["id"]
    assert _train_status(client)["status"] == "STOPPED"


def test_running_training_counts_starting_and_queued_tasks_but_not_stale_ones(monkeypatch):
    """The app's notion of "a training is running", on MONAI Label's own task records (no server)."""
    import importlib.util

    import monailabel.utils.async_tasks.utils as async_tasks

    sys.path.insert(0, os.path.join(ROOT, "monailabel_app"))
    try:
        spec = importlib.util.spec_from_file_location("hyperspace_app_main", os.path.join(ROOT, "monailabel_app", "main.py"))
        app_main = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(app_main)
    finally:
        sys.path.pop(0)

    def ts(seconds_ago: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - seconds_ago))

    def state(tasks: list, running: tuple = ()):
        monkeypatch.setattr(async_tasks, "background_tasks", {"train": tasks})
        monkeypatch.setattr(async_tasks, "background_processes", {"train": {t: object() for t in running}})
        return app_main.running_training()

    done = {"id": "a", "status": "DONE", "start_ts": ts(300)}
    starting = {"id": "b", "status": "SUBMITTED", "start_ts": ts(1)}
    stale = {"id": "c", "status": "SUBMITTED", "start_ts": ts(120)}  # its start failed in MONAI Label's thread
    running = {"id": "d", "status": "RUNNING", "start_ts": ts(200)}
    assert state([]) is None and state([done]) is None
    assert state([done, starting]) is starting
    assert state([done, stale]) is None
    assert state([done, running, stale], running=("d",)) is running  # the one that runs, not the queued one
    assert state([done, stale, {**running, "status": "DONE"}]) is None
