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

Checkpoints are pickles, and unpickling can run code: `read_file` does not unpickle. It
reads the file with `pickles.read_data`, which builds dicts, lists, tuples, numbers, strings
and numpy arrays itself and nothing else, then makes the tensors paddle.load would.
"""
import dataclasses
import glob
import os
import pickle
import random
import re
from dataclasses import dataclass

import numpy as np
import paddle

import models
import utils
from harness import data as datasets
from harness import errors, files, pickles, runtime

FORMAT = "swa-paddle/1"
# Keys of the original PyTorch code's checkpoints; every checkpoint has them.
ORIGINAL_KEYS = ("epoch", "state_dict", "swa_state_dict", "swa_n", "optimizer")


# --------------------------------------------------------------------------- names

def checkpoint_path(directory, epoch, step=0):
    """`<directory>/checkpoint-<epoch>.pdparams`, or `...-<epoch>-step<step>...` mid-epoch."""
    suffix = f"-step{step}" if step else ""
    return os.path.join(directory, f"checkpoint-{epoch}{suffix}.pdparams")


def parse_checkpoint_name(name):
    """(epoch, step) of a file name `checkpoint_path` writes, or None for any other name (also
    `checkpoint-010.pdparams`: train.py never writes leading zeros)."""
    match = re.fullmatch(r"checkpoint-(0|[1-9]\d*)(?:-step([1-9]\d*))?\.pdparams", name)
    return (int(match[1]), int(match[2] or 0)) if match else None


def list_checkpoints(directory):
    """The checkpoints in `directory` as {(epoch, step): path}; the newest is max()."""
    found = {}
    for path in glob.glob(os.path.join(glob.escape(directory), "checkpoint-*.pdparams")):
        position = parse_checkpoint_name(os.path.basename(path))
        if position is not None and os.path.isfile(path):
            found[position] = path
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
                in_channels=ds.image_shape[0], data=ds.fingerprint,
                normalization={"mean": [float(v) for v in ds.mean], "std": [float(v) for v in ds.std]})


def atomic_save(obj, path):
    """paddle.save `obj` to `path` atomically (see `files.atomic_write`). Returns `path`."""
    return files.atomic_write(path, lambda tmp: paddle.save(obj, tmp))


# --------------------------------------------------------------------------- reading

def read_file(path, what="checkpoint"):
    """The object in a file of paddle.save, built from data only (`pickles.read_data`) and
    given tensors as paddle.load gives them; CheckpointError naming the file if it cannot be
    read or holds anything but data."""
    if os.path.isdir(path):
        raise errors.CheckpointError(f"{what} {path} is a folder; give the .pdparams file in it")
    if not os.path.exists(path):
        raise errors.CheckpointError(f"{what} {path} does not exist")
    if not os.path.isfile(path):
        raise errors.CheckpointError(f"{what} {path} is not a regular file (a device or a pipe); "
                                     "give a .pdparams file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = pickles.read_data(raw, encoding="latin1")
    except pickles.Refused as e:
        raise errors.CheckpointError(f"{what} {path} tries to load {e}, which no checkpoint "
                                     "holds: refused before building it (a file from someone "
                                     "else may be made to run code when unpickled)") from None
    except Exception as e:  # truncated or foreign bytes raise many types
        raise errors.CheckpointError(f"{what} {path} is unreadable, truncated or not a Paddle "
                                     f"file ({type(e).__name__})") from None
    return _as_paddle_loads(data)


def _as_paddle_loads(data):
    """Tensors where paddle.load would give them: paddle.save writes a tensor as the pair
    (name, array); a file with such pairs gets tensors for them (other arrays stay numpy), one
    without gets tensors for its arrays (the layout of older Paddle versions). A state dict
    saved on its own lists its tensors' names under "StructuredToParameterName@@"."""
    if isinstance(data, dict) and isinstance(data.get("StructuredToParameterName@@"), dict):
        names = data.pop("StructuredToParameterName@@")
        return {k: paddle.to_tensor(v) if k in names and isinstance(v, np.ndarray) else v
                for k, v in data.items()}
    pairs = _Tensors(_is_saved_tensor).contains(data)
    return _Tensors(_is_saved_tensor if pairs else (lambda v: isinstance(v, np.ndarray)))(data)


def _is_saved_tensor(value):
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) \
        and isinstance(value[1], np.ndarray)


class _Tensors:
    """Replaces the values `is_tensor` accepts by tensors, visiting each object once (what
    `pickles.read_data` gives may share parts; they stay shared)."""

    def __init__(self, is_tensor):
        self.is_tensor, self.done = is_tensor, {}

    def contains(self, value):
        if self.is_tensor(value):
            return True
        if id(value) in self.done or not isinstance(value, (dict, list, tuple)):
            return False
        self.done[id(value)] = value
        items = value.values() if isinstance(value, dict) else value
        return any(self.contains(v) for v in items)

    def __call__(self, value):
        if id(value) in self.done:
            return self.done[id(value)][0]
        if self.is_tensor(value):
            tensor = paddle.to_tensor(value[1] if isinstance(value, tuple) else value)
            if isinstance(value, tuple):
                tensor.name = value[0]
            result = tensor
        elif isinstance(value, dict):
            result = {k: self(v) for k, v in value.items()}
        elif isinstance(value, (list, tuple)):
            result = type(value)(self(v) for v in value)
        else:
            return value
        self.done[id(value)] = (result, value)
        return result


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
    """Load `state_dict` into `model` strictly (see `utils.load_state_dict`); a mismatch, or a
    tensor holding NaN or infinity, is a CheckpointError naming `source` and the tensor."""
    check_finite(state_dict, source)
    try:
        return utils.load_state_dict(model, state_dict, source)
    except ValueError as e:
        raise errors.CheckpointError(str(e)) from None


def check_finite(state_dict, source="state dict"):
    """CheckpointError naming the first floating-point tensor of `state_dict` that holds NaN
    or infinity (weights a diverged run left: a model built from them predicts nonsense)."""
    for key, value in (state_dict or {}).items():
        array = value.numpy() if isinstance(value, paddle.Tensor) else np.asarray(value)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise errors.CheckpointError(f"{source}: {key} holds NaN or infinite values; these "
                                         "weights cannot be used (the run that wrote them "
                                         "diverged?); use an earlier checkpoint")


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
