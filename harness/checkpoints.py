"""The checkpoint: its schema, writing and reading it, and rebuilding what it was trained with.

    >>> path = save_checkpoint("runs/a", 10, state_dict=model.state_dict(),
    ...                        optimizer=optimizer.state_dict(), **swa.state_dict())
    >>> ckpt = load_checkpoint(path); ckpt["epoch"], ckpt["swa_n"]
    (10, 3)
    >>> trained = rebuild(ckpt, path)           # its model (empty), data and batch size
    >>> load_weights(trained.model, ckpt["swa_state_dict"]); trained.refresh_batches()

This is the only module that calls paddle.save and paddle.load. A checkpoint is one dict:

    format          FORMAT ("swa-paddle/<version>"); files of the original code have none
    epoch, step     epochs completed; batches completed in the next epoch (0 at an epoch's end)
    state_dict      the SGD weights             optimizer       its state
    swa_state_dict  the average (None without)  swa_n           models averaged (None without)
    swa_bn_updated, swa_ema_decay, swag_*        the rest of `utils.SWA/SWAG.state_dict()`
    args            train.py's flags            run_id, world_size   the run it belongs to
    rng             Python's and numpy's generators   rank_state    per-rank state mid-epoch
    model_name, dataset, num_classes, in_channels, normalization   what `rebuild` reads

Like any pickle, load only files you trust.
"""
import dataclasses
import glob
import os
import random
import re
from dataclasses import dataclass

import numpy as np
import paddle

import models
import utils
from harness import data as datasets
from harness import errors, files, runtime

FORMAT = "swa-paddle/1"
# Keys of the original PyTorch code's checkpoints; every checkpoint has them.
ORIGINAL_KEYS = ("epoch", "state_dict", "swa_state_dict", "swa_n", "optimizer")


# --------------------------------------------------------------------------- names

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


# --------------------------------------------------------------------------- writing

def save_checkpoint(directory, epoch, step=0, **state):
    """Write `<directory>`'s checkpoint of (epoch, step) atomically; returns its path.
    See `write_checkpoint`."""
    return write_checkpoint(checkpoint_path(directory, epoch, step), epoch, step, **state)


def write_checkpoint(path, epoch, step=0, **state):
    """Write a checkpoint (the schema above) to `path` atomically and return `path`.

    Args:
        path: the file to write.
        epoch: epochs completed.
        step: batches completed in epoch `epoch` (0-based) when saved mid-epoch.
        **state: the other keys of the schema; at least `state_dict`, `swa_state_dict`,
            `swa_n`, `optimizer` (tensors, state dicts, numbers, strings, numpy arrays).
    """
    return atomic_save(dict(format=FORMAT, epoch=epoch, step=step, **state), path)


def setting_of(model_name, ds):
    """The checkpoint keys that say what a model was trained on, for `rebuild`."""
    return dict(model_name=model_name, dataset=ds.name, num_classes=ds.num_classes,
                in_channels=ds.image_shape[0],
                normalization={"mean": [float(v) for v in ds.mean], "std": [float(v) for v in ds.std]})


def atomic_save(obj, path):
    """paddle.save `obj` to `path` atomically (see `files.atomic_write`). Returns `path`."""
    return files.atomic_write(path, lambda tmp: paddle.save(obj, tmp))


# --------------------------------------------------------------------------- reading

def read_file(path, what="checkpoint"):
    """The object in a file of paddle.save; CheckpointError naming the file if it cannot be read."""
    if not os.path.isfile(path):
        raise errors.CheckpointError(f"{what} {path} does not exist")
    try:
        return paddle.load(path)
    except Exception as e:  # paddle.load raises many types for bad bytes
        raise errors.CheckpointError(f"{what} {path} is unreadable, truncated or not a Paddle "
                                     f"file ({type(e).__name__})") from None


def load_checkpoint(path):
    """Read a checkpoint written by `write_checkpoint` (or the original code's layout).

    Raises:
        CheckpointError: the file is missing, unreadable, truncated, not a checkpoint, or of a
            newer format; the message names the file.
    """
    data = read_file(path)
    missing = [key for key in ("epoch", "state_dict") if not isinstance(data, dict) or key not in data]
    if missing:
        raise errors.CheckpointError(f"{path} is not a training checkpoint (no "
                                     f"{' or '.join(missing)} entry); a plain weights file is "
                                     "not a checkpoint")
    if data.get("format", FORMAT) != FORMAT:
        raise errors.CheckpointError(f"{path} is of format {data['format']!r}, this code reads "
                                     f"{FORMAT!r}: use the version of swa-paddle that wrote it")
    return data


def read_weights(path, what="--init"):
    """The weights in `path`: a state dict saved with paddle.save, or a checkpoint's SGD weights."""
    weights = read_file(path, what)
    if isinstance(weights, dict) and isinstance(weights.get("state_dict"), dict):
        weights = weights["state_dict"]
    return weights if isinstance(weights, dict) else {}


def load_weights(model, state_dict, source="state dict"):
    """Load `state_dict` into `model` strictly (see `utils.load_state_dict`); a mismatch is a
    CheckpointError naming `source`."""
    try:
        return utils.load_state_dict(model, state_dict, source)
    except ValueError as e:
        raise errors.CheckpointError(str(e)) from None


# --------------------------------------------------------------------------- rebuilding

@dataclass
class Trained:
    """What a checkpoint was trained with, rebuilt: its model (empty), data and batch size."""
    model: paddle.nn.Layer
    ds: datasets.Data
    model_name: str
    batch_size: int
    seed: int           # train.py's --seed
    epoch: int          # epochs completed

    def refresh_batches(self):
        """The batches of train.py's BatchNorm refresh after this checkpoint's last epoch
        (one process): refreshing from them gives the statistics train.py computed."""
        return datasets.refresh_batches(self.ds, self.batch_size, self.seed, max(self.epoch - 1, 0))


def rebuild(ckpt, path, model_name=None, dataset=None, data_path=None, batch_size=None,
            device="auto", threads=0):
    """The model, dataset (normalised as in training) and batch size of checkpoint `ckpt`
    (read from `path`), on `device` (auto/cpu/gpu; on a CPU with `threads`, 0: automatic);
    values given override the checkpoint's. UsageError if it does not say."""
    saved = ckpt.get("args") or {}
    model_name = model_name or ckpt.get("model_name") or saved.get("model")
    dataset = dataset or ckpt.get("dataset") or saved.get("dataset")
    if model_name is None or dataset is None:
        raise errors.UsageError(f"{path} does not say which model and dataset it holds; "
                                "pass --model and --dataset")
    try:
        model_name = models.canonical_name(model_name)
    except ValueError as e:
        raise errors.UsageError(str(e)) from None
    if runtime.select_device(device) == "cpu":
        runtime.tune_cpu(threads, model_name)
    ds = datasets.load_dataset(dataset, data_path or saved.get("data_path", "data"),
                               download=not saved.get("no_download", False))
    if saved.get("val_size"):  # trained on what the validation split left
        ds = datasets.split_validation(ds, saved["val_size"], saved.get("seed", 1))
    norm = ckpt.get("normalization")
    if norm and len(norm["mean"]) == ds.image_shape[0]:
        ds = dataclasses.replace(ds, mean=np.array(norm["mean"], np.float32),
                                 std=np.array(norm["std"], np.float32))
    return Trained(models.build(model_name, ds.num_classes, ds.image_shape[0]), ds, model_name,
                   batch_size or saved.get("batch_size", 128), saved.get("seed", 1),
                   int(ckpt["epoch"]))


# --------------------------------------------------------------------------- generators

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
