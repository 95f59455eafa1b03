"""Checkpoints that survive a killed job, and resuming a bundle's training from them.

MONAI's ``CheckpointSaver`` writes through ignite's ``DiskSaver(atomic=False)`` (ignite's atomic
mode leaves the file readable by its owner only), and ignite deletes the old best file before it
writes the new one under the same fixed name. A job killed in between leaves no model, or a
truncated one where the MONAI Label app reads it. Here:

- :func:`save_atomic`: temporary file in the same folder, flush + fsync, ``os.replace``, created
  with the permissions the umask gives (what ``open`` would give).
- :class:`AtomicDiskSaver`: ignite's ``DiskSaver`` writing through :func:`save_atomic`, and deleting
  a replaced file only once its successor is in place.
- :class:`AtomicCheckpointSaver`: MONAI's ``CheckpointSaver`` with its files written by
  :class:`AtomicDiskSaver`, and a ``state_dict`` of its best-metric record, so a resumed run
  replaces ``model.pt`` only with a better model than the best one so far.
- :class:`RandomStates`: every random generator a training run draws from, as a ``state_dict``.
- :class:`LastCheckpoint`: the run's resume point (network, optimizer, trainer epoch and iteration,
  best metric, random states, and whatever else its ``save_dict`` names, e.g. an LR scheduler),
  written every ``save_interval`` epochs; with ``resume`` it is loaded back by MONAI's
  ``CheckpointLoader`` before the first epoch.
- :func:`check_ckpt_dir`: a new run never overwrites a previous one silently.

In the bundles' ``train.json``: ``--resume true`` continues from ``models/last_model.pt``;
``--overwrite true`` starts a new run in a ``ckpt_dir`` that holds one (what the MONAI Label app
does when it fine-tunes). The files written, for ``model_file`` ``model.pt``::

    models/model.pt        the network with the best validation metric: a plain state_dict
    models/last_model.pt   {"network", "optimizer", "trainer", "checkpointer", "rng", ...}
"""

from __future__ import annotations

import glob
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import ignite.distributed as idist
import numpy as np
import torch
from monai.utils import str2bool
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

__all__ = [
    "AtomicCheckpointSaver",
    "AtomicDiskSaver",
    "LastCheckpoint",
    "RandomStates",
    "check_ckpt_dir",
    "parse_flag",
    "save_atomic",
    "temporary_path",
]

logger = logging.getLogger(__name__)

# Test hook only: seconds to sleep after a checkpoint's temporary file is complete and before it
# replaces the checkpoint, so that a test can kill the process at exactly that point.
PAUSE_ENV = "HYPERSPACE_TEST_CHECKPOINT_PAUSE_S"



def parse_flag(value: Any, name: str) -> bool:
    """A yes/no option as a config or a command line gives it.

    ``python -m monai.bundle run ... --resume true`` passes the string ``"true"`` (and ``"false"``,
    which is truthy in Python), so strings are parsed: ``true``/``false``/``yes``/``no``/``1``/``0``.

    Raises:
        ValueError: naming the option and the value.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    try:
        return str2bool(str(value).strip())  # MONAI's reading of yes/no strings
    except ValueError:
        raise ValueError(f"{name} {value!r} must be true or false.") from None


def temporary_path(path: str | Path) -> Path:
    """Where :func:`save_atomic` writes ``path`` first: a hidden file in the same folder, named by process."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_atomic(obj: Any, path: str | Path, save: Callable = torch.save, **kwargs: Any) -> Path:
    """Write ``obj`` to ``path`` so that a reader (or a kill) sees the old file or the new one, whole.

    ``save(obj, file, **kwargs)`` writes to a temporary file in the same folder
    (:func:`temporary_path`), which is flushed and fsynced, then renamed over ``path`` with
    ``os.replace`` (atomic within a file system) and the rename fsynced. The temporary file is
    created with mode ``0o666`` minus the umask, so the checkpoint gets the permissions any file
    the user writes gets (ignite's atomic mode, through ``tempfile``, leaves ``0o600``). On an
    error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = temporary_path(path)
    tmp.unlink(missing_ok=True)  # left by a killed process that had this pid
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            save(obj, f, **kwargs)
            f.flush()
            os.fsync(f.fileno())
        pause = os.environ.get(PAUSE_ENV)
        if pause:
            print(f"{PAUSE_ENV}: {tmp} is written; pausing {pause} s before it replaces {path}", file=sys.stderr, flush=True)
            time.sleep(float(pause))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


class AtomicDiskSaver(DiskSaver):
    """ignite's ``DiskSaver`` writing through :func:`save_atomic`, for ignite's ``Checkpoint``.

    Args:
        dirname: the folder (created if missing; files already in it are fine).
        filename: a fixed file name used instead of the one ``Checkpoint`` makes up (as MONAI's
            ``CheckpointSaver`` does for ``key_metric_filename``).
        save_on_rank: the process that writes, in a distributed run.
    """

    def __init__(self, dirname: str | Path, filename: str | None = None, save_on_rank: int = 0, **kwargs: Any):
        super().__init__(dirname, atomic=True, create_dir=True, require_empty=False, save_on_rank=save_on_rank, **kwargs)
        self.filename = filename
        self._replaced: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        super().__call__(checkpoint, self.filename or filename, metadata)

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        save_atomic(checkpoint, path, func, **self.kwargs)
        for name in self._replaced:
            if name != path.name:
                (self.dirname / name).unlink(missing_ok=True)
        self._replaced.clear()

    def remove(self, filename: str) -> None:
        # ignite's Checkpoint removes the file it replaces *before* writing its successor, which under
        # a fixed name is the same file: a kill in between would leave no model. Remove it afterwards.
        if idist.get_rank() == self.save_on_rank:
            self._replaced.append(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver``, every file written atomically (:class:`AtomicDiskSaver`).

    Arguments as for ``monai.handlers.CheckpointSaver``, plus ``interval_filename``: a fixed name
    for the ``save_interval`` checkpoint (with ``n_saved=1``, one file replaced every interval).

    Its ``state_dict`` is the best-metric record: ignite's list of kept key-metric checkpoints
    with their scores, and ``best_metric`` / ``best_metric_epoch`` of the engine it is attached to
    (the evaluator). Restored on resume, a later, worse validation does not replace the best file.
    """

    def __init__(self, *args: Any, interval_filename: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._engine: Engine | None = None
        for checkpoint, fixed in (
            (self._final_checkpoint, None),
            (self._key_metric_checkpoint, None),
            (self._interval_checkpoint, interval_filename),
        ):
            if checkpoint is not None:
                fixed = fixed or getattr(checkpoint.save_handler, "filename", None)  # MONAI's fixed names
                checkpoint.save_handler = AtomicDiskSaver(self.save_dir, filename=fixed)

    def attach(self, engine: Engine) -> None:
        self._engine = engine
        super().attach(engine)

    def state_dict(self) -> dict:
        saved = self._key_metric_checkpoint._saved if self._key_metric_checkpoint is not None else []
        state: dict[str, Any] = {"_saved": [(float(p), str(f)) for p, f in saved]}
        if self._engine is not None:
            state["best_metric"] = float(self._engine.state.best_metric)
            state["best_metric_epoch"] = int(self._engine.state.best_metric_epoch)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        if self._key_metric_checkpoint is not None:
            self._key_metric_checkpoint.load_state_dict({"_saved": state_dict["_saved"]})
        if self._engine is not None and "best_metric" in state_dict:
            self._engine.state.best_metric = state_dict["best_metric"]
            self._engine.state.best_metric_epoch = state_dict["best_metric_epoch"]


def _numpy_state(generator: np.random.RandomState) -> dict:
    # a plain dict of a tensor and numbers: loadable with torch.load(weights_only=True), as
    # MONAI's CheckpointLoader loads, which refuses numpy arrays
    kind, keys, pos, has_gauss, cached = generator.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_state(generator: np.random.RandomState, state: Mapping) -> None:
    keys = state["keys"].cpu().numpy().astype(np.uint32)
    generator.set_state(("MT19937", keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))


def _transform_generators(transform: Any) -> list[np.random.RandomState]:
    """The ``R`` generators of ``transform`` and of the transforms nested in it, in a fixed order."""
    found, stack = [], [transform]
    while stack:
        t = stack.pop(0)
        if t is None:
            continue
        if isinstance(getattr(t, "R", None), np.random.RandomState):
            found.append(t.R)
        stack[:0] = list(getattr(t, "transforms", ()) or ())
    return found


class RandomStates:
    """The random generators a training run draws from, as one ``state_dict`` for a checkpoint.

    PyTorch's (CPU, and CUDA where it is initialised), NumPy's and Python's global generators, and
    the own generators (``R``) of the random transforms in ``transform``: MONAI's randomisable
    transforms keep their own ``numpy.random.RandomState``, which MONAI's ``DataLoader`` seeds once
    in the main process (with ``num_workers > 0`` the workers are seeded from PyTorch's generator
    every epoch, so that case is covered by PyTorch's state). Restored, a resumed run shuffles and
    augments as the uninterrupted run would have.

    Args:
        transform: the training preprocessing (e.g. a ``Compose``), or ``None``.
    """

    def __init__(self, transform: Any = None):
        self.transform = transform

    def state_dict(self) -> dict:
        version, internal, gauss = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state(np.random.mtrand._rand),
            "python": [version, list(internal), gauss],
            "transforms": [_numpy_state(g) for g in _transform_generators(self.transform)],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: Mapping) -> None:
        # CheckpointLoader's map_location may have moved the tensors to the GPU; the setters want CPU bytes
        torch.set_rng_state(state_dict["torch"].cpu())
        _set_numpy_state(np.random.mtrand._rand, state_dict["numpy"])
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
        generators = _transform_generators(self.transform)
        if len(generators) != len(state_dict["transforms"]):
            logger.warning(
                f"the checkpoint holds {len(state_dict['transforms'])} transform random states, the training "
                f"preprocessing has {len(generators)} random transforms: their draws are not restored."
            )
        else:
            for g, s in zip(generators, state_dict["transforms"]):
                _set_numpy_state(g, s)
        cuda = state_dict.get("cuda")
        if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def check_ckpt_dir(ckpt_dir: str, best_file: str, last_file: str, resume: Any = False, overwrite: Any = False) -> bool:
    """Decide how a training run treats ``ckpt_dir``; return whether it resumes from ``last_file``.

    - ``resume``: continue from ``last_file`` if it exists; with neither ``best_file`` nor
      ``last_file`` present there is nothing to continue and a new run starts (so a restart script
      may always pass ``--resume true``); ``best_file`` alone (no resume point) is refused.
    - ``overwrite``: a new run, even where one exists. The previous resume point is deleted now (a
      kill before the new run's first one must not resume the old run); its ``best_file`` stays
      until the new run replaces it at its first validation.
    - neither: a new run, refused if ``best_file`` or ``last_file`` exists.

    Only the process of rank 0 deletes. ``resume`` and ``overwrite`` may be the strings a command
    line passes (:func:`parse_flag`).

    Raises:
        FileExistsError: a previous run would be overwritten; the message names its files and the
            options (``--resume true``, another ``--ckpt_dir``, ``--overwrite true``).
        FileNotFoundError: ``resume`` with ``best_file`` but no ``last_file`` to continue from.
        ValueError: ``resume`` and ``overwrite`` both true, or a flag that is not true/false.
    """
    resume, overwrite = parse_flag(resume, "resume"), parse_flag(overwrite, "overwrite")
    if resume and overwrite:
        raise ValueError("--resume true continues the run in ckpt_dir, --overwrite true replaces it: pass only one.")
    best, last = os.path.join(ckpt_dir, best_file), os.path.join(ckpt_dir, last_file)
    existing = [p for p in (best, last) if os.path.isfile(p)]
    if overwrite:
        if os.path.isfile(last) and idist.get_rank() == 0:
            logger.warning(f"--overwrite true: deleting the previous run's resume point {last}; {best} is replaced at the first validation.")
            os.remove(last)
        return False
    if resume and os.path.isfile(last):
        return True
    if resume and not existing:
        logger.warning(f"--resume true: {ckpt_dir} holds no {best_file} or {last_file}, so there is nothing to resume; starting a new run.")
        return False
    if resume:
        raise FileNotFoundError(
            f"--resume true: {best} exists but {last} does not, so there is no point to resume from (a run "
            f"from a version without resumable checkpoints, or one killed between its first {best_file} and "
            f"its first {last_file}). Choose another --ckpt_dir, or pass --overwrite true (instead of --resume) "
            "to start a new run there."
        )
    if existing:
        options = "pass --resume true to continue it, " if os.path.isfile(last) else ""
        raise FileExistsError(
            f"{ckpt_dir} already holds a training run ({', '.join(existing)}); a new run would overwrite it. "
            f"To keep it, {options}choose another --ckpt_dir (or --bundle_root), or pass --overwrite true to "
            "start a new run that replaces it."
        )
    return False


class _TrainerScaler:
    """The trainer's AMP ``GradScaler`` as a checkpoint entry, looked up when saved or loaded: MONAI's
    ``Trainer.run()`` makes a new one (or ``None`` without AMP) after the handlers are attached."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def state_dict(self) -> dict:
        scaler = getattr(self.engine, "scaler", None)
        return scaler.state_dict() if scaler is not None and scaler.is_enabled() else {}

    def load_state_dict(self, state_dict: Mapping) -> None:
        scaler = getattr(self.engine, "scaler", None)
        if state_dict and scaler is not None and scaler.is_enabled():  # {}: saved without AMP, keep the new scale
            scaler.load_state_dict(state_dict)


class LastCheckpoint:
    """The resume point of a training run: saved every ``save_interval`` epochs, loaded with ``resume``.

    Attach it to the trainer *after* the trainer's own handlers (the bundles do it in their
    ``training`` list), so that it saves after the epoch's validation: the best metric and
    ``best_file`` it records are then those of that epoch.

    The file holds ``save_dict`` plus ``"trainer"`` (the engine's epoch and iteration) and
    ``"scaler"`` (AMP's loss scale; empty without AMP). In the bundles ``save_dict`` is ``network``,
    ``optimizer``, ``checkpointer`` (the best-model saver's record, :class:`AtomicCheckpointSaver`)
    and ``rng`` (:class:`RandomStates`); add an LR scheduler as ``"lr_scheduler"`` to have it saved
    and restored too (``--last_checkpoint#save_dict#lr_scheduler "@lr_scheduler"``). Writing
    goes through :class:`AtomicCheckpointSaver` (MONAI's ``CheckpointSaver`` with ``save_interval``),
    loading through MONAI's ``CheckpointLoader`` at the trainer's ``STARTED`` event, which also
    keeps the configured ``max_epochs`` (so ``--epochs`` may grow on resume).

    Args:
        save_dir: the bundle's ``ckpt_dir``.
        save_dict: name -> object with ``state_dict`` / ``load_state_dict``.
        filename: the file in ``save_dir``, e.g. ``last_model.pt``.
        best_file: the run's best-model file in ``save_dir`` (``model.pt``), for :func:`check_ckpt_dir`.
        save_interval: epochs between saves (the bundles' ``val_interval``).
        resume, overwrite: see :func:`check_ckpt_dir`.
        map_location: where the loaded tensors go (the training device).

    Example (what ``train.json`` does)::

        last = LastCheckpoint("models", {"network": net, "optimizer": opt}, "last_model.pt", "model.pt", resume=True)
        last.check_ckpt_dir()     # before the data are cached: refuse early
        last.attach(trainer)
        trainer.run()
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Mapping[str, Any],
        filename: str = "last_model.pt",
        best_file: str = "model.pt",
        save_interval: int = 1,
        resume: Any = False,
        overwrite: Any = False,
        map_location: Any = None,
    ):
        if int(save_interval) < 1:
            raise ValueError(f"save_interval must be >= 1 epoch, got {save_interval}.")
        for name in ("trainer", "scaler"):
            if name in save_dict:
                raise ValueError(f"save_dict must not name {name!r}: LastCheckpoint adds the engine's {name} itself.")
        self.save_dir = str(save_dir)
        self.save_dict = dict(save_dict)
        self.filename = str(filename)
        self.best_file = str(best_file)
        self.save_interval = int(save_interval)
        self.resume = parse_flag(resume, "resume")
        self.overwrite = parse_flag(overwrite, "overwrite")
        self.map_location = map_location
        self._resuming: bool | None = None

    @property
    def path(self) -> str:
        return os.path.join(self.save_dir, self.filename)

    def check_ckpt_dir(self) -> bool:
        """:func:`check_ckpt_dir` for this run (once); whether it resumes."""
        if self._resuming is None:
            self._resuming = check_ckpt_dir(self.save_dir, self.best_file, self.filename, self.resume, self.overwrite)
        return self._resuming

    def attach(self, engine: Engine) -> None:
        resuming = self.check_ckpt_dir()
        if idist.get_rank() == 0:
            for name in (self.filename, self.best_file):  # left by killed runs
                for stale in glob.glob(os.path.join(glob.escape(self.save_dir), f".{glob.escape(name)}.*.tmp")):
                    os.remove(stale)
        to_save = {**self.save_dict, "trainer": engine, "scaler": _TrainerScaler(engine)}
        if resuming:
            CheckpointLoader(self.path, to_save, map_location=self.map_location).attach(engine)
            engine.add_event_handler(Events.STARTED, self._log_resumed)
        saver = AtomicCheckpointSaver(
            self.save_dir, to_save, save_interval=self.save_interval, n_saved=1, interval_filename=self.filename
        )
        saver.attach(engine)

    def _log_resumed(self, engine: Engine) -> None:
        s = engine.state
        best = self.save_dict.get("checkpointer")
        record = best.state_dict() if isinstance(best, AtomicCheckpointSaver) else {}
        best_text = ""
        if record.get("best_metric_epoch", -1) >= 1:  # MONAI's engines start at -1: none yet
            best_text = f"; best validation metric {record['best_metric']:.4f} at epoch {record['best_metric_epoch']}"
        done = " (already finished: pass a larger --epochs to train on)" if s.epoch >= s.max_epochs else ""
        engine.logger.info(f"Resumed from {self.path}: epoch {s.epoch}/{s.max_epochs}, iteration {s.iteration}{best_text}{done}")
