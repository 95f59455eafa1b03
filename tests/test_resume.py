"""Training that survives faults (custom_networks.checkpoint, custom_networks.data.checks).

A bundle's training, as `python -m monai.bundle run training` subprocesses on generated BraTS data
with CPU-sized overrides, is killed with SIGKILL in the middle of an epoch and again in the middle
of a checkpoint write (deterministically: the test hook HYPERSPACE_TEST_CHECKPOINT_PAUSE_S makes the
saver pause once its temporary file is complete, and the test kills it then), and `--resume true`
finishes the run. Bad training inputs stop before the trainer starts, naming the file or value.
"""

import glob
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

from custom_networks import HyperUNet
from custom_networks.checkpoint import (
    PAUSE_ENV,
    AtomicDiskSaver,
    LastCheckpoint,
    RandomStates,
    check_ckpt_dir,
    parse_flag,
    save_atomic,
)
from custom_networks.data.checks import TrainingDataError, check_training_data, read_geometry
from custom_networks.data.datalist import make_datalist
from custom_networks.data.synthetic_datasets import write_synthetic_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_JSON = os.path.join(ROOT, "bundles", "brats_mri_tumour_segmentation", "configs", "train.json")
# 6 generated cases: 4 training (2 steps per epoch at batch size 2), 1 validation, 1 test
SMALL = ["--patch_size", "[32,32,32]", "--network_def#channels", "[8,16]", "--num_workers", "0", "--batch_size", "2"]
LOSS = re.compile(r"Epoch: (\d+)/\d+, Iter: (\d+)/\d+ -- train_loss: ([0-9.]+)")
# the log prints losses with 4 decimals; a resumed run that restarted the network, the optimizer or
# the random draws gives a different loss at the same step (by 0.1 or more here)
LOSS_TOLERANCE = 1e-3


def _cmd(data, root, *overrides):
    return [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", TRAIN_JSON,
            "--dataset_dir", str(data), "--bundle_root", str(root), *SMALL, *overrides]


def _env(**extra):
    # CPU-sized runs pinned to the CPU (device and amp follow torch.cuda.is_available() in train.json)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", **extra}


def _run(cmd, timeout=600):
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _start(cmd, log, **env):
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=_env(**env), stdout=f, stderr=subprocess.STDOUT)


def _wait_for(proc, log, pattern, timeout=600):
    """The first match of ``pattern`` in the process's log, as soon as it appears."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = open(log, errors="replace").read()
        match = re.search(pattern, text)
        if match:
            return match
        if proc.poll() is not None:
            raise AssertionError(f"training exited with {proc.returncode} before {pattern!r} appeared:\n{text[-4000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"{pattern!r} did not appear in {timeout} s")


def _kill(proc):
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _losses(log):
    return {(int(e), int(i)): float(v) for e, i, v in LOSS.findall(open(log, errors="replace").read())}


def _network():
    return HyperUNet(out_channels=2, channels=(8, 16))


def _load_best(path):
    """The best-model file as the app and CheckpointLoader read it: a plain state_dict of the network."""
    _network().load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def _load_last(path):
    last = torch.load(path, map_location="cpu", weights_only=True)
    _network().load_state_dict(last["network"])
    return last


def _epoch(last):
    """Epochs completed in a last checkpoint: ignite's engine state holds the iteration and the epoch length."""
    return last["trainer"]["iteration"] // last["trainer"]["epoch_length"]


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("brats_data")
    write_synthetic_dataset("brats", str(folder), n_cases=6, seed=0)
    return folder


@pytest.fixture(scope="module")
def killed_and_resumed(data, tmp_path_factory):
    """Train 3 epochs; SIGKILL in epoch 2; resume and SIGKILL during a checkpoint write; resume to the end.

    Returns the logs, the checkpoint folder right after each kill (copied), and the run's root.
    """
    work = tmp_path_factory.mktemp("resume")
    root, models = work / "root", work / "root" / "models"
    run = {"root": root, "logs": {k: work / f"{k}.log" for k in "ABC"}}
    cmd = _cmd(data, root, "--epochs", "3", "--val_interval", "1")

    a = _start(cmd, run["logs"]["A"])
    try:
        _wait_for(a, run["logs"]["A"], r"Epoch: 2/3, Iter: 1/2 -- train_loss")
    finally:
        _kill(a)
    shutil.copytree(models, work / "after_kill_mid_epoch")

    b = _start(cmd + ["--resume", "true"], run["logs"]["B"], **{PAUSE_ENV: "600"})
    try:
        pause = _wait_for(b, run["logs"]["B"], rf"{PAUSE_ENV}: (\S+) is written; pausing \S+ s before it replaces (\S+)\n")
    finally:
        _kill(b)
    shutil.copytree(models, work / "after_kill_during_write")
    run["paused"] = {"tmp": os.path.basename(pause.group(1)), "target": os.path.basename(pause.group(2))}

    c = _start(cmd + ["--resume", "true"], run["logs"]["C"])
    run["returncode"] = c.wait(timeout=600)
    run["snapshots"] = {"A": work / "after_kill_mid_epoch", "B": work / "after_kill_during_write"}
    return run


def test_a_kill_in_the_middle_of_an_epoch_leaves_loadable_checkpoints(killed_and_resumed):
    snap = killed_and_resumed["snapshots"]["A"]
    assert LOSS.search(open(killed_and_resumed["logs"]["A"]).read()), "run A never trained"
    if (snap / "model.pt").exists():  # absent only if no validation had finished yet
        _load_best(snap / "model.pt")
    last = _load_last(snap / "last_model.pt")
    assert _epoch(last) == 1 and last["trainer"]["iteration"] == 2, last["trainer"]  # killed in epoch 2
    assert set(last) >= {"network", "optimizer", "trainer", "checkpointer", "rng"}
    assert last["checkpointer"]["best_metric_epoch"] == 1


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_file_whole(killed_and_resumed):
    before, after = killed_and_resumed["snapshots"]["A"], killed_and_resumed["snapshots"]["B"]
    paused = killed_and_resumed["paused"]
    target, tmp = paused["target"], paused["tmp"]
    assert target in ("model.pt", "last_model.pt") and re.fullmatch(rf"\.{re.escape(target)}\.\d+\.tmp", tmp), paused
    # the new checkpoint was complete in its temporary file, and the kill came before os.replace
    assert (after / tmp).exists()
    _load_best(after / "model.pt")
    assert _epoch(_load_last(after / "last_model.pt")) == 1
    assert _digest(after / target) == _digest(before / target)  # the previous file, untouched
    new = torch.load(after / tmp, map_location="cpu", weights_only=True)
    if target == "last_model.pt":
        assert _epoch(new) == 2
    else:
        _network().load_state_dict(new)


def test_resume_continues_the_epoch_count_and_the_losses(killed_and_resumed):
    logs, models = killed_and_resumed["logs"], killed_and_resumed["root"] / "models"
    text = open(logs["C"]).read()
    assert killed_and_resumed["returncode"] == 0, text[-4000:]
    assert "Resumed from" in text and "epoch 1/3, iteration 2" in text, text[-4000:]
    a, b, c = (_losses(logs[k]) for k in "ABC")
    assert sorted({e for e, _ in b}) == [2] and sorted({e for e, _ in c}) == [2, 3]  # epochs go on from the checkpoint
    # the same step gives the same loss in every run: network, optimizer and random draws were restored
    first = min(c)
    assert first == (2, 1) and first in a and first in b
    for k in sorted(set(c) & (set(a) | set(b))):
        for killed in (a, b):
            if k in killed:
                assert abs(c[k] - killed[k]) <= LOSS_TOLERANCE, (k, c[k], killed[k])
    last_before_kill = b[max(b)]
    assert abs(c[max(b)] - last_before_kill) <= LOSS_TOLERANCE
    last = _load_last(models / "last_model.pt")
    assert _epoch(last) == 3 and last["trainer"]["iteration"] == 6
    _load_best(models / "model.pt")
    assert sorted(os.listdir(models)) == ["last_model.pt", "model.pt"]  # the killed run's temporary file is gone
    umask = os.umask(0)
    os.umask(umask)
    for name in ("last_model.pt", "model.pt"):
        assert stat.S_IMODE(os.stat(models / name).st_mode) == 0o666 & ~umask, name


BEST_MODEL_SCRIPT = f"""
import os, torch
from ignite.engine import Engine, Events
from custom_networks.checkpoint import PAUSE_ENV, AtomicCheckpointSaver
net = torch.nn.Linear(2, 1)
evaluator = Engine(lambda engine, batch: None)
@evaluator.on(Events.EPOCH_COMPLETED)
def better_every_epoch(engine):
    engine.state.metrics["dice"] = engine.state.epoch / 10
    net.weight.data.fill_(engine.state.epoch)
saver = AtomicCheckpointSaver(os.environ["CKPT_DIR"], {{"model": net}}, save_key_metric=True,
                              key_metric_name="dice", key_metric_filename="model.pt")
saver.attach(evaluator)
evaluator.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda _: os.environ.update({{PAUSE_ENV: "600"}}))
evaluator.run([0], max_epochs=3)
"""


def test_a_kill_while_the_best_model_is_replaced_leaves_the_previous_one(tmp_path):
    """The bundle's best-model saver, killed after writing a better model and before renaming it over
    model.pt (the training run above may pause on last_model.pt instead, when validation did not improve)."""
    log = tmp_path / "log"
    proc = _start([sys.executable, "-c", BEST_MODEL_SCRIPT], log, CKPT_DIR=str(tmp_path))
    try:
        pause = _wait_for(proc, log, rf"{PAUSE_ENV}: (\S+) is written")
    finally:
        _kill(proc)
    best = torch.load(tmp_path / "model.pt", weights_only=True)
    assert best["weight"].eq(1).all()  # epoch 1's model, whole
    assert torch.load(pause.group(1), weights_only=True)["weight"].eq(2).all()  # epoch 2's, not yet renamed
    assert sorted(os.listdir(tmp_path)) == sorted(["log", "model.pt", os.path.basename(pause.group(1))])


def test_a_second_run_without_resume_is_refused_and_changes_nothing(killed_and_resumed, data):
    models = killed_and_resumed["root"] / "models"
    before = {name: _digest(models / name) for name in os.listdir(models)}
    result = _run(_cmd(data, killed_and_resumed["root"], "--epochs", "1"))
    assert result.returncode != 0
    assert "already holds a training run" in result.stdout + result.stderr and "--resume true" in result.stderr, result.stderr[-3000:]
    assert {name: _digest(models / name) for name in os.listdir(models)} == before


# --- bad training inputs: non-zero exit, a message naming the case, no checkpoint ---------------------


def _training_case(data):
    """Image and label of a case in the training split (not the test split, which training never reads)."""
    item = make_datalist("brats", str(data))["training"][0]
    return item["image"], item["label"]


def _break_batch(data, tmp_path):
    return ["--batch_size", "5"], ["4 training case(s)", "batch_size 5", "_t1ce.nii.gz"]


def _break_missing_datalist(data, tmp_path):
    path = str(tmp_path / "no_such_datalist.json")
    return ["--data_list_file_path", path], [path, "does not exist"]


def _break_empty_datalist(data, tmp_path):
    path = tmp_path / "empty_datalist.json"
    datalist = make_datalist("brats", str(data))
    path.write_text(json.dumps({**datalist, "training": []}))
    return ["--data_list_file_path", str(path)], [str(path), "has no 'training' cases"]


def _break_label_values(data, tmp_path):
    _, label = _training_case(data)
    seg = nib.load(label)
    values = np.asarray(seg.dataobj).copy()
    values[0, 0, 0] = 3  # BraTS 2023's enhancing tumour: not in the BraTS 2021 map
    nib.save(nib.Nifti1Image(values, seg.affine, seg.header), label)
    # default cache_rate 1: MapLabelsd refuses it as CacheDataset loads, before the first step. The process
    # then aborts ("terminate called without an active exception", SIGABRT) because CacheDataset's loading
    # thread still runs at exit: a non-zero exit all the same, after the message
    return [], [label, "values 3"]


def _break_shape(data, tmp_path):
    _, label = _training_case(data)
    seg = nib.load(label)
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj)[:-2], seg.affine, seg.header), label)
    return [], [label, "spatial shape"]


def _break_affine(data, tmp_path):
    _, label = _training_case(data)
    seg = nib.load(label)
    moved = seg.affine.copy()
    moved[:3, 3] += 5.0  # the label 5 mm off its image
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj), moved), label)
    return [], [label, "affine", "voxel grid"]


def _break_layout(data, tmp_path):
    other = tmp_path / "mmwhs"
    write_synthetic_dataset("mmwhs", str(other), n_cases=3, seed=0)
    return ["--dataset_dir", str(other)], ["no brats images in", str(other), "mmwhs"]


BAD_INPUTS = {
    "fewer_cases_than_batch_size": _break_batch,
    "missing_data_list": _break_missing_datalist,
    "empty_data_list": _break_empty_datalist,
    "label_value_not_in_the_label_map": _break_label_values,
    "label_of_another_shape": _break_shape,
    "label_of_another_affine": _break_affine,
    "dataset_dir_not_in_the_layout": _break_layout,
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_training_input_stops_naming_it_and_leaves_no_checkpoint(case, data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    overrides, expected = BAD_INPUTS[case](copy, tmp_path)
    root = tmp_path / "root"
    result = _run(_cmd(copy, root, "--epochs", "1", "--val_interval", "1", *overrides))
    assert result.returncode != 0, result.stdout[-2000:]
    for text in expected:
        assert text in result.stderr, f"{text!r} not in stderr:\n{result.stderr[-4000:]}"
    assert "Epoch: 1/1" not in result.stdout  # stopped before the first step
    assert not glob.glob(str(root / "**" / "*.pt"), recursive=True)


# --- the pieces, in-process ----------------------------------------------------------------------------


def test_parse_flag_reads_command_line_strings():
    assert parse_flag("true", "resume") is True and parse_flag("false", "resume") is False  # "false" is truthy
    assert parse_flag(True, "x") is True and parse_flag(0, "x") is False
    with pytest.raises(ValueError, match="resume 'maybe'"):
        parse_flag("maybe", "resume")


def test_check_ckpt_dir_never_overwrites_a_run_silently(tmp_path):
    d = str(tmp_path)
    assert check_ckpt_dir(d, "model.pt", "last_model.pt") is False  # empty: a new run
    assert check_ckpt_dir(d, "model.pt", "last_model.pt", resume="true") is False  # nothing to resume: a new run
    torch.save({}, tmp_path / "model.pt")
    with pytest.raises(FileExistsError, match="already holds a training run.*another --ckpt_dir.*--overwrite true"):
        check_ckpt_dir(d, "model.pt", "last_model.pt")
    with pytest.raises(FileNotFoundError, match="last_model.pt does not, so there is no point to resume from"):
        check_ckpt_dir(d, "model.pt", "last_model.pt", resume=True)
    assert check_ckpt_dir(d, "model_fs.pt", "last_model_fs.pt") is False  # another model of the bundle: its own files
    torch.save({}, tmp_path / "last_model.pt")
    with pytest.raises(FileExistsError, match="pass --resume true to continue it"):
        check_ckpt_dir(d, "model.pt", "last_model.pt")
    assert check_ckpt_dir(d, "model.pt", "last_model.pt", resume=True) is True
    with pytest.raises(ValueError, match="only one"):
        check_ckpt_dir(d, "model.pt", "last_model.pt", resume=True, overwrite=True)
    assert check_ckpt_dir(d, "model.pt", "last_model.pt", overwrite="true") is False
    assert not (tmp_path / "last_model.pt").exists() and (tmp_path / "model.pt").exists()


def test_save_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "model.pt"
    save_atomic({"w": torch.ones(3)}, path)

    def broken(obj, f):
        f.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_atomic({"w": torch.zeros(3)}, path, broken)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["model.pt"]


def test_atomic_disk_saver_replaces_a_fixed_name_without_deleting_it_first(tmp_path):
    """ignite's Checkpoint calls remove() before it writes; the file must exist all the while."""
    saver = AtomicDiskSaver(tmp_path, filename="model.pt")
    saver({"w": torch.ones(1)}, "model_key_metric=0.1.pt")
    saver.remove("model_key_metric=0.1.pt")
    assert (tmp_path / "model.pt").exists()
    saver({"w": torch.full((1,), 2.0)}, "model_key_metric=0.2.pt")
    assert torch.load(tmp_path / "model.pt", weights_only=True)["w"].item() == 2.0
    assert os.listdir(tmp_path) == ["model.pt"]
    other = AtomicDiskSaver(tmp_path / "n")  # without a fixed name, a replaced file is removed after the write
    other({"w": torch.ones(1)}, "a.pt")
    other.remove("a.pt")
    other({"w": torch.ones(1)}, "b.pt")
    assert os.listdir(tmp_path / "n") == ["b.pt"]


def _toy_run(tmp_path, epochs, resume):
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def step(engine, x):
        opt.zero_grad()
        loss = net(x + torch.rand(1)).pow(2).mean()  # draws from torch's generator every step
        loss.backward()
        opt.step()
        return loss.item()

    trainer = Engine(step)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: sched.step())
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output))
    last = LastCheckpoint(str(tmp_path), {"network": net, "optimizer": opt, "lr_scheduler": sched, "rng": RandomStates()},
                          save_interval=1, resume=resume)
    last.attach(trainer)
    trainer.run([torch.ones(1, 2)] * 3, max_epochs=epochs)
    return losses, sched, trainer


def test_last_checkpoint_restores_an_lr_scheduler_and_the_epoch_count(tmp_path):
    straight, _, _ = _toy_run(tmp_path / "straight", 4, resume=False)
    first, _, _ = _toy_run(tmp_path / "resumed", 2, resume=False)
    second, sched, trainer = _toy_run(tmp_path / "resumed", 4, resume=True)
    assert trainer.state.epoch == 4 and trainer.state.iteration == 12
    assert sched.last_epoch == 4 and sched.get_last_lr() == [0.1 * 0.5**4]
    np.testing.assert_allclose(first + second, straight, rtol=1e-6)  # as if never interrupted


def test_check_training_data_names_every_bad_case(tmp_path):
    write_synthetic_dataset("spider", str(tmp_path / "s"), n_cases=3, seed=0)  # .mha, two header conventions
    items = make_datalist("spider", str(tmp_path / "s"), val_fraction=0.3, test_fraction=0.0)
    train, val = items["training"], items["validation"]
    check_training_data(train, val, "spider", batch_size=2, label_values=True)
    shape, affine = read_geometry(train[0]["image"])
    assert len(shape) == 3 and affine.shape == (4, 4)
    with pytest.raises(TrainingDataError, match="2 training case.*batch_size 2 on each of 2 processes"):
        check_training_data(train, val, "spider", batch_size=2, world_size=2)
    with pytest.raises(TrainingDataError, match="validation list is empty"):
        check_training_data(train, [], "spider", batch_size=1)
    swapped = [{"image": train[0]["image"], "label": train[1]["label"]}, {"image": "/no/such.mha", "label": train[1]["label"]}]
    with pytest.raises(TrainingDataError, match="2 problem") as e:
        check_training_data(swapped, val, "spider", batch_size=1)
    assert train[1]["label"] in str(e.value) and "/no/such.mha: no such file" in str(e.value)
    # a label drawn in 3D Slicer carries its own value map: its values are checked against that one
    own_map = [{**train[0], "label_map": {0: 0, 1: 1}}]
    with pytest.raises(TrainingDataError, match="values .*100"):
        check_training_data(own_map, val, "spider", batch_size=1, label_values=True)
