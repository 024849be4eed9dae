"""Checkpoint files: written atomically, read with a clear error, portable between machines.

    >>> path = save_checkpoint("runs/a", 10, state_dict=model.state_dict(),
    ...                        optimizer=optimizer.state_dict(), **swa.state_dict())
    >>> ckpt = load_checkpoint(path); ckpt["epoch"], ckpt["swa_n"]
    (10, 3)

A checkpoint is a dict saved with paddle.save; like any pickle, load only files you trust.
"""
import glob
import os
import random
import re
import uuid

import numpy as np
import paddle

import cli
import utils

CHECKPOINT_FORMAT = "swa-paddle/1"
# Keys of the original PyTorch code's checkpoints; every checkpoint has them.
CHECKPOINT_KEYS = ("epoch", "state_dict", "swa_state_dict", "swa_n", "optimizer")


class CheckpointError(cli.UsageError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


def checkpoint_path(directory, epoch, step=0):
    """`<directory>/checkpoint-<epoch>.pdparams`, or `...-<epoch>-step<step>...` mid-epoch."""
    suffix = f"-step{step}" if step else ""
    return os.path.join(directory, f"checkpoint-{epoch}{suffix}.pdparams")


def list_checkpoints(directory):
    """The checkpoints in `directory` as {(epoch, step): path}; the newest is max()."""
    found = {}
    for path in glob.glob(os.path.join(glob.escape(directory), "checkpoint-*.pdparams")):
        match = re.fullmatch(r"checkpoint-(\d+)(?:-step(\d+))?\.pdparams", os.path.basename(path))
        if match:
            found[(int(match[1]), int(match[2] or 0))] = path
    return found


def describe_position(epoch, step):
    """Where a checkpoint stands, in words: 'epoch 10' or 'epoch 11 step 5 (mid-epoch)'."""
    return f"epoch {epoch}" if not step else f"epoch {epoch + 1} step {step} (mid-epoch)"


def save_checkpoint(directory, epoch, step=0, **state):
    """Write a checkpoint atomically and return its path.

    The dict holds `epoch` (epochs completed), `step` (batches completed in the next epoch,
    0 at an epoch boundary), a format tag and everything in `state`; pass at least the
    original code's keys `state_dict`, `swa_state_dict`, `swa_n`, `optimizer`.

    Args:
        directory: run directory (must exist).
        epoch: epochs completed.
        step: batches completed in epoch `epoch` (0-based) when saved mid-epoch.
        **state: tensors, state dicts, numbers, strings, numpy arrays, nested dicts/lists.

    Returns:
        The checkpoint's path.
    """
    path = checkpoint_path(directory, epoch, step)
    return atomic_save(dict(format=CHECKPOINT_FORMAT, epoch=epoch, step=step, **state), path)


def atomic_save(obj, path):
    """paddle.save `obj` to `path` through a temporary file in the same folder, flushed to
    disk and renamed: `path` is either absent, its old content, or complete (also when the
    disk fills up: the temporary file is removed and the OSError raised). Returns `path`."""
    tmp = f"{os.path.abspath(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask's mode, not 0600
    try:
        paddle.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = path
        raise
    return path


def load_checkpoint(path):
    """Read a checkpoint written by `save_checkpoint` (or the original code's layout).

    Raises:
        CheckpointError: the file is missing, unreadable, truncated, or not a checkpoint;
            the message names the file.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = paddle.load(path)
    except Exception as e:  # paddle.load raises many types for bad bytes
        raise CheckpointError(f"checkpoint {path} is unreadable, truncated or not a Paddle "
                              f"file ({type(e).__name__})") from None
    missing = [key for key in ("epoch", "state_dict") if not isinstance(data, dict) or key not in data]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint (no {' or '.join(missing)} "
                              "entry); a plain weights file is not a checkpoint")
    return data


def load_weights(model, state_dict, source="state dict"):
    """Load `state_dict` into `model`, requiring the same names and shapes (each value cast to
    the model tensor's dtype). Paddle's own `set_state_dict` skips mismatched entries with a
    warning; this refuses them.

    Raises:
        ValueError: keys or shapes differ (e.g. a checkpoint of another model).
    """
    return utils._load_state(model, state_dict, source)


def get_rng_state():
    """Python's and numpy's global generator states, for a checkpoint.

    Paddle's generator is not saved: train.py seeds it from (seed, rank, epoch, step) before
    every step, which makes a resume exact on any number and kind of devices (a saved CUDA
    state has one entry per visible GPU and fits only the same device set).
    """
    return {"python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state):
    """Restore what `get_rng_state` returned (a Paddle generator state saved by an older
    version is ignored: see get_rng_state)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
