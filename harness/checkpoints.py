"""The checkpoint: its record, writing and reading it, resuming a run from it, and rebuilding
what it was trained with.

    >>> record = Checkpoint(epoch=10, state_dict=model.state_dict(),
    ...                     optimizer=optimizer.state_dict(), **swa.state_dict())
    >>> path = save_checkpoint("runs/a", record)
    >>> ckpt = load_checkpoint(path); ckpt.epoch, ckpt.swa_n
    (10, 3)
    >>> trained = rebuild(ckpt, path)           # its model (empty), data and batch size
    >>> load_weights(trained.model, ckpt.swa_state_dict); trained.refresh_batches()

This is the only module that calls paddle.save and paddle.load. A checkpoint is one record,
`Checkpoint`: every writer builds one, every reader gets one checked field by field.

Checkpoints are pickles, and unpickling can run code: `read_file` does not unpickle. It
reads the file with `pickles.read_data`, which builds dicts, lists, tuples, numbers, strings
and numpy arrays itself and nothing else, then makes the tensors paddle.load would.
"""
import dataclasses
import glob
import math
import os
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


# --------------------------------------------------------------------------- the record

class _Bad(Exception):
    """A field's value is not what the record says: the message says what it should be."""


def _whole(minimum=0):
    def check(value):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
                or not minimum <= value < 2**53:
            raise _Bad(f"a whole number >= {minimum}")
        return int(value)
    return check


def _flag(value):
    if not isinstance(value, (bool, np.bool_)):
        raise _Bad("True or False")
    return bool(value)


def _instance(*kinds, what):
    def check(value):
        if not isinstance(value, kinds):
            raise _Bad(what)
        return value
    return check


def _list_of(check_item, what):
    def check(value):
        if not isinstance(value, (list, tuple)):
            raise _Bad(what)
        try:
            return [check_item(v) for v in value]
        except _Bad:
            raise _Bad(what) from None
    return check


def _weights(value):
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, (paddle.Tensor, np.ndarray)) for k, v in value.items()):
        raise _Bad("a state dict (names to tensors)")
    return value


def _decay(value):
    try:
        return float(utils.check_ema_decay(value))  # the core's own check of a decay
    except ValueError:
        raise _Bad("a number in [0, 1)") from None


def _finite(value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                     np.floating)) \
            or not math.isfinite(value):
        raise _Bad("a finite number")
    return float(value)


def _snapshot_name(value):
    if not (isinstance(value, str) and re.fullmatch(r"fge-(0|[1-9]\d*)\.pdparams", value)):
        raise _Bad("file names fge-<epoch>.pdparams (beside the checkpoint)")
    return value


def _normalization(value):
    if not (isinstance(value, dict) and set(value) == {"mean", "std"}):
        raise _Bad("{'mean': [...], 'std': [...]}")
    mean = _list_of(_finite, "a list of finite numbers per channel")(value["mean"])
    std = _list_of(_finite, "a list of finite numbers per channel")(value["std"])
    if len(mean) != len(std) or not mean or min(std) <= 0:
        raise _Bad("a mean and a positive std for each channel")
    return {"mean": mean, "std": std}


def _fingerprint(value):
    if not (isinstance(value, dict) and set(value) == {"train", "test", "digest"}
            and isinstance(value["digest"], str)):
        raise _Bad("{'train': N, 'test': N, 'digest': text}")
    return {"train": _whole()(value["train"]), "test": _whole()(value["test"]),
            "digest": value["digest"]}


# train.py's flags that a checkpoint's readers use, with what each must be
_ARGS = {"batch_size": _whole(1), "seed": _whole(0), "val_size": _whole(0), "epochs": _whole(0),
         "swa_start": _whole(0), "model": _instance(str, what="a model name"),
         "dataset": _instance(str, what="a dataset name"),
         "data_path": _instance(str, what="a folder"), "no_download": _flag}


def _plain(value):
    return value is None or type(value) in (bool, int, float, str)


def _args(value):
    # plain values only: a resume compares them with the command's
    if not (isinstance(value, dict) and all(isinstance(k, str) and (_plain(v) or (
            isinstance(v, list) and all(map(_plain, v)))) for k, v in value.items())):
        raise _Bad("train.py's flags, by name")
    for name, check in _ARGS.items():
        if value.get(name) is not None:
            try:
                check(value[name])
            except _Bad as e:
                raise _Bad(f"flags with {name} {e}") from None
    return value


def _rng(value):
    # Tried on throwaway generators: a state Python or numpy would refuse is refused here,
    # in one line, before any generator of the run changes. numpy does not check the
    # position in its key (a wrong one crashes the process at the next draw): checked here.
    try:
        random.Random().setstate(value["python"])
        kind, key, position, has_gauss, _ = value["numpy"]
        if not (kind == "MT19937" and isinstance(key, np.ndarray) and key.dtype == np.uint32
                and key.shape == (624,) and type(position) is int and 0 <= position <= 624
                and has_gauss in (0, 1)):
            raise ValueError("not a plain MT19937 state")
        np.random.RandomState().set_state(value["numpy"])
    except Exception:
        raise _Bad("{'python': random.getstate(), 'numpy': np.random.get_state()}") from None
    return value


def _rank_state(value):
    entries = _list_of(_instance(dict, what="-"), "a list of per-rank dicts")(value)
    for entry in entries:
        if not (isinstance(entry.get("partial"), (dict, type(None)))
                and isinstance(entry.get("statistics"), list)
                and all(isinstance(s, (np.ndarray, paddle.Tensor)) for s in entry["statistics"])):
            raise _Bad("per-rank {'partial': sums, 'statistics': arrays}")
    return entries


def _field(check, default=None, required=False):
    if required:  # no default: a writer must give it
        return dataclasses.field(metadata={"check": check, "required": True})
    return dataclasses.field(default=default, metadata={"check": check, "required": False})


@dataclass
class Checkpoint:
    """One checkpoint: every field any writer sets, each checked when a file is read.

    The file is this record as a dict (`to_dict`), so the original code's keys (epoch,
    state_dict, swa_state_dict, swa_n, optimizer) are where it put them, and its files load.

        format          FORMAT ("swa-paddle/<version>"); files of the original code have none
        epoch           epochs completed
        step            batches completed in the next epoch (0 at an epoch's end)
        state_dict      the SGD weights (with their BatchNorm statistics)
        optimizer       the optimizer's state ({} or None where it is not kept)
        swa_state_dict  the average's weights (None without an average)
        swa_n           models averaged (None without an average)
        swa_bn_updated  the average's BatchNorm statistics are recomputed, not averaged
        swa_ema_decay   an EMA's decay (None: the equal average)
        swa_ema_warmup  an EMA's warm-up (gamma, power, minimum decay), or None
        swag_var_sum    SWAG: the running mean of squares (None without SWAG)
        swag_deviations  SWAG: the last deviations from the mean, oldest first
        swag_max_rank   SWAG: deviations kept
        swag_names      SWAG: the parameters it models, in order
        args            train.py's flags, by name
        run_id          the run it belongs to
        world_size      processes that trained it
        rng             Python's and numpy's generator states
        rank_state      per rank, mid-epoch: partial sums and BatchNorm statistics
        amp_scaler      the loss scaler's state under --amp (None without)
        fge_snapshots   FGE's snapshots so far, file names beside the checkpoint
        fge_snapshot    this file is an FGE snapshot (not resumable)
        averaged_from   the checkpoints average_checkpoints.py averaged into this one
        model_name      the zoo model
        dataset         the dataset's name
        num_classes     classes
        in_channels     image channels
        normalization   per-channel mean and std the inputs were normalised with
        data            sizes and digest of the dataset's files (see data.fingerprint)
    """
    epoch: int = _field(_whole(), required=True)
    state_dict: dict = _field(_weights, required=True)
    optimizer: dict | None = _field(_instance(dict, what="a state dict"))
    format: str = _field(_instance(str, what="text"), FORMAT)
    step: int = _field(_whole(), 0)
    swa_state_dict: dict | None = _field(_weights)
    swa_n: int | None = _field(_whole())
    swa_bn_updated: bool = _field(_flag, False)
    swa_ema_decay: float | None = _field(_decay)
    swa_ema_warmup: list | None = _field(_list_of(_finite, "three numbers"))
    swag_var_sum: object = _field(_instance(paddle.Tensor, np.ndarray, what="a tensor"))
    swag_deviations: list | None = _field(_list_of(_instance(paddle.Tensor, np.ndarray, what="-"),
                                                    "a list of tensors"))
    swag_max_rank: int | None = _field(_whole(2))
    swag_names: list | None = _field(_list_of(_instance(str, what="-"), "a list of names"))
    args: dict | None = _field(_args)
    run_id: str | None = _field(_instance(str, what="text"))
    world_size: int | None = _field(_whole(1))
    rng: dict | None = _field(_rng)
    rank_state: list | None = _field(_rank_state)
    amp_scaler: dict | None = _field(_instance(dict, what="a state dict"))
    fge_snapshots: list | None = _field(_list_of(_snapshot_name, "file names fge-<epoch>.pdparams"))
    fge_snapshot: bool = _field(_flag, False)
    averaged_from: list | None = _field(_list_of(_instance(str, what="-"), "a list of paths"))
    model_name: str | None = _field(_instance(str, what="a model name"))
    dataset: str | None = _field(_instance(str, what="a dataset name"))
    num_classes: int | None = _field(_whole(1))
    in_channels: int | None = _field(_whole(1))
    normalization: dict | None = _field(_normalization)
    data: dict | None = _field(_fingerprint)

    @property
    def has_average(self):
        """Whether it holds an average with at least one model."""
        return bool(self.swa_n) and self.swa_state_dict is not None

    def average_state(self):
        """The average's fields that are set, as `utils.SWA/SWAG.set_state_dict` read them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name.startswith(("swa_", "swag_")) and getattr(self, f.name) is not None}

    def to_dict(self):
        """The record as the file holds it: every field, None where unset."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data, path):
        """The record in `data` (a file's dict); CheckpointError naming the first field that is
        not what the record says, and what it should be."""
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.metadata["required"] and (not isinstance(data, dict) or f.name not in data)]
        if missing:
            raise errors.CheckpointError(f"{path} is not a training checkpoint (no "
                                         f"{' or '.join(missing)} entry); a plain weights file "
                                         "is not a checkpoint")
        written = data.get("format", FORMAT)
        if not isinstance(written, str) or written != FORMAT:
            raise errors.CheckpointError(f"{path} is of format {str(written)[:40]!r}, this "
                                         f"code reads {FORMAT!r}: use the version of swa-paddle "
                                         "that wrote it")
        values = {}
        for f in dataclasses.fields(cls):
            value = data.get(f.name)
            if value is None:
                continue  # the default
            try:
                values[f.name] = f.metadata["check"](value)
            except _Bad as e:
                raise errors.CheckpointError(f"{path}: its {f.name} is not {e}; the file is "
                                             "damaged or was not written by this code") from None
        return cls(**values)


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
    """Where a checkpoint stands, in words, as its file name counts: 'epoch 10', or 'epoch 10
    + 5 batches (mid-epoch)' for checkpoint-10-step5.pdparams."""
    return f"epoch {epoch}" if not step else f"epoch {epoch} + {step} batches (mid-epoch)"


# --------------------------------------------------------------------------- writing

def save_checkpoint(directory, record):
    """Write `record` (a Checkpoint) as `<directory>`'s checkpoint of its (epoch, step),
    atomically; returns its path."""
    return write_checkpoint(checkpoint_path(directory, record.epoch, record.step), record)


def write_checkpoint(path, record):
    """Write `record` (a Checkpoint) to `path` atomically and return `path`."""
    if not isinstance(record, Checkpoint):
        raise TypeError("write_checkpoint writes a Checkpoint record")
    return atomic_save(record.to_dict(), path)


def setting_of(model_name, ds):
    """The Checkpoint fields that say what a model was trained on, for `rebuild`."""
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
    try:
        return _as_paddle_loads(data)
    except (ValueError, TypeError, OSError, RuntimeError) as e:  # what Paddle's tensors refuse
        raise errors.CheckpointError(f"{what} {path} holds an array Paddle cannot make a tensor "
                                     f"of ({type(e).__name__}); the file is not a Paddle "
                                     "checkpoint") from None


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
    """The Checkpoint in `path` (written by `write_checkpoint`, or of the original code).

    Raises:
        CheckpointError: the file is missing, unreadable, truncated, not a checkpoint, of a
            newer format, or holds a field that is not what the record says; the message
            names the file (and the field).
    """
    return Checkpoint.from_dict(read_file(path), path)


def read_weights(path, what="--init"):
    """The weights in `path`: a state dict saved with paddle.save, or a checkpoint's SGD weights."""
    return read_start(path, what)[0]


def read_start(path, what="--init", optimizer=False):
    """(weights, optimizer state) of a run's start from `path`: its weights as `read_weights`
    reads them, and with `optimizer` the checkpoint's optimizer state (else None).

    Raises:
        CheckpointError: with `optimizer`, the file holds no optimizer state (a plain state
            dict, a checkpoint written before the first step, an FGE snapshot).
    """
    data = read_file(path, what)
    is_checkpoint = isinstance(data, dict) and isinstance(data.get("state_dict"), dict)
    weights = data["state_dict"] if is_checkpoint else data if isinstance(data, dict) else {}
    if not optimizer:
        return weights, None
    state = data.get("optimizer") if is_checkpoint else None
    if not state or not isinstance(state, dict):
        kind = ("a checkpoint saved before the first step, or an FGE snapshot" if is_checkpoint
                else "weights alone, not a checkpoint")
        raise errors.CheckpointError(f"--init_optimizer: {path} holds no optimizer state ({kind}); "
                                     "give a checkpoint of a run after some training, or drop "
                                     "--init_optimizer")
    return weights, state


def load_optimizer_state(optimizer, model, state, source):
    """Load `state`, another run's optimizer state, into `optimizer`, the fresh Momentum
    optimizer of `model`'s trainable parameters, if it fits: one momentum buffer per parameter
    under the name Paddle gives it (`<parameter name>_velocity_0`), of the parameter's shape,
    finite, and nothing else. CheckpointError naming the first misfit, before any change."""
    named = {p.name: name for name, p in model.named_parameters() if p.trainable}
    shapes = {f"{p.name}_velocity_0": list(p.shape) for p in model.parameters() if p.trainable}
    extra = sorted(set(state) - set(shapes))
    if extra:
        raise errors.CheckpointError(f"{source}: its optimizer state holds {extra[0]}, which this "
                                     "run's optimizer has not (another model, optimizer or --amp "
                                     "O2); drop --init_optimizer")
    for key, shape in shapes.items():
        value = state.get(key)
        layer = named[key[:-len("_velocity_0")]]
        if not isinstance(value, (paddle.Tensor, np.ndarray)):
            raise errors.CheckpointError(f"{source}: its optimizer state has no momentum for "
                                         f"{layer} ({key}); drop --init_optimizer")
        if list(value.shape) != shape:
            raise errors.CheckpointError(f"{source}: its momentum for {layer} has shape "
                                         f"{list(value.shape)}, the parameter {shape}; drop "
                                         "--init_optimizer")
    check_finite_optimizer(state, source)
    optimizer.set_state_dict(state)


def load_weights(model, state_dict, source="state dict"):
    """Load `state_dict` into `model` strictly (see `utils.load_state_dict`); a mismatch, a
    tensor holding NaN or infinity, or a negative BatchNorm variance is a CheckpointError
    naming `source` and the tensor."""
    check_weights(state_dict, source)
    try:
        return utils.load_state_dict(model, state_dict, source)
    except ValueError as e:
        raise errors.CheckpointError(str(e)) from None


def check_weights(state_dict, source="state dict"):
    """CheckpointError naming the first tensor of `state_dict` that no trained model holds: a
    floating-point one with NaN or infinity (weights a diverged run left), or a BatchNorm
    running variance (`*._variance`) with a negative entry (no batch has one). A model built
    from either predicts nonsense without a word. Each tensor is read once."""
    for key, value in (state_dict or {}).items():
        array = value.numpy() if isinstance(value, paddle.Tensor) else np.asarray(value)
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            raise errors.CheckpointError(f"{source}: {key} holds NaN or infinite values; these "
                                         "weights cannot be used (the run that wrote them "
                                         "diverged?); use an earlier checkpoint")
        if key.endswith("_variance") and array.dtype.kind == "f" and (array < 0).any():
            raise errors.CheckpointError(f"{source}: the BatchNorm variance {key} is negative; "
                                         "the file is damaged or not a model's weights")


def check_finite_optimizer(state, path):
    """Refuse a checkpoint whose optimizer state (momentum buffers, O2's master weights) holds
    NaN or infinity: finite weights would be driven to NaN by the first step after resuming.
    `path`: the checkpoint, or "--flag path" when it came from another flag than --resume."""
    def walk(value, key):
        if isinstance(value, dict):
            for k, v in value.items():
                yield from walk(v, f"{key}/{k}" if key else str(k))
        elif isinstance(value, (paddle.Tensor, np.ndarray, float)):
            yield key, value.numpy() if isinstance(value, paddle.Tensor) else np.asarray(value)

    for key, array in walk(state or {}, ""):
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            source = path if str(path).startswith("--") else f"--resume {path}"
            raise errors.CheckpointError(f"{source}: the optimizer state {key} holds NaN or "
                                         "infinite values (the run diverged before it was saved?); "
                                         "use an earlier checkpoint")


def kept_checkpoints(directory):
    """What a failed run left in `directory`, for the disk-full message."""
    found = list_checkpoints(directory)
    if not found:
        return "no checkpoint was written"
    return f"the newest checkpoint is {found[max(found)]}"


def resume(ckpt, path, model, optimizer, average=None, amp=None, fingerprint=None,
           dataset="the dataset"):
    """Load training checkpoint `ckpt` (read from `path`) into a run's parts: the SGD weights,
    the optimizer's state, the average (None: none), the loss scaler (None: none), and
    Python's and numpy's generators. Returns `ckpt`.

    Raises:
        CheckpointError: the files of `dataset` changed since it was trained (their
            `fingerprint` differs), or a part does not fit or holds NaN or infinity.
    """
    saved = ckpt.data
    if saved and fingerprint and saved != fingerprint:
        change = (f"{saved['train']} training and {saved['test']} test images then, "
                  f"{fingerprint['train']} and {fingerprint['test']} now"
                  if (saved["train"], saved["test"]) != (fingerprint["train"], fingerprint["test"])
                  else "the same sizes, other contents")
        raise errors.CheckpointError(f"--resume {path}: the {dataset} files in --data_path "
                                     f"changed since the run was trained ({change}); put the "
                                     "run's files back, or start a new run in another --dir")
    load_weights(model, ckpt.state_dict, source=path)
    check_weights(ckpt.swa_state_dict, source=f"{path} (the average)")
    check_finite_optimizer(ckpt.optimizer, path)
    try:
        optimizer.set_state_dict(ckpt.optimizer or {})
        if average is not None:
            average.set_state_dict(ckpt.average_state())
    except (ValueError, KeyError) as e:
        raise errors.CheckpointError(f"cannot resume from {path}: {e}") from None
    if amp:
        amp.load_state_dict(ckpt.amp_scaler)
    if ckpt.rng is not None:
        set_rng_state(ckpt.rng)
    return ckpt


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
    saved = ckpt.args or {}
    model_name = model_name or ckpt.model_name or saved.get("model")
    dataset = dataset or ckpt.dataset or saved.get("dataset")
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
    norm = ckpt.normalization
    ds = datasets.as_trained(ds, saved.get("val_size"), saved.get("seed", 1),
                             (norm["mean"], norm["std"]) if norm else None)
    return Trained(models.build(model_name, ds.num_classes, ds.image_shape[0]), ds, model_name,
                   batch_size or saved.get("batch_size", 128), saved.get("seed", 1), ckpt.epoch)


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
