"""Datasets from their official files, held in memory as uint8, and a fast batch loader.

    >>> data = load_dataset("CIFAR10", "./data")   # reads ./data/cifar-10-python.tar.gz
    >>> train = Batches(data.train, 128, data.mean, data.std, shuffle=True,
    ...                 augment=data.augment, seed=1)
    >>> for x, y in train(epoch=0): ...

Batches are assembled with numpy, a whole batch at a time (the crops are views of the padded
batch, copied by one index), so loading runs far faster than training on a CPU. The order
and the augmentation of an epoch are a pure function of (seed, epoch): an interrupted epoch
can be resumed at any batch, and sharding over processes does not change what a sample
looks like.
"""
import contextlib
import dataclasses
import gzip
import hashlib
import io
import os
import sys
import tarfile
import threading
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from harness import errors, pickles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_FILE = os.path.join(ROOT, "data", "digits.npz")  # embedded in the repository




@dataclass
class ArrayDataset:
    images: np.ndarray   # uint8, (N, H, W, C)
    labels: np.ndarray   # int64, (N,)

    def __len__(self):
        return len(self.labels)


@dataclass(frozen=True)
class Augment:
    pad: int = 0         # random crop of the image zero-padded by `pad` pixels on each side
    flip: bool = False   # random horizontal flip


@dataclass
class Data:
    name: str
    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    mean: np.ndarray     # per channel, of the training images scaled to [0, 1]
    std: np.ndarray
    augment: Augment
    val: ArrayDataset | None = None   # held out of the training set by `split_validation`
    fingerprint: dict | None = None   # what the files held: see `fingerprint`

    @property
    def image_shape(self):
        """(C, H, W) of one input image."""
        height, width, channels = self.train.images.shape[1:]
        return channels, height, width


# --------------------------------------------------------------------------- file formats

def _check_labels(labels, classes, where):
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise errors.DataError(f"{where} holds labels from {labels.min()} to {labels.max()}, outside "
                               f"0..{classes - 1}: not the official file; download it again")


def _cifar_batch(raw, label_key, where, classes):
    try:
        batch = pickles.read_data(raw, encoding="bytes")  # data only: no code runs
    except pickles.Refused as e:
        raise errors.DataError(f"{where} tries to load {e}, which no CIFAR batch holds: refused "
                               "before building it; download the official file again") from None
    except Exception as e:  # truncated or foreign bytes raise many types
        raise errors.DataError(f"{where} is unreadable or truncated ({type(e).__name__}); "
                               "download the official file again") from None
    if not isinstance(batch, dict) or not isinstance(batch.get(b"data"), np.ndarray):
        raise errors.DataError(f"{where} holds no image array: not the official file; "
                               "download it again")
    data = batch[b"data"]
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (KeyError, TypeError, ValueError, OverflowError):
        raise errors.DataError(f"{where} holds no list of whole-number labels under {label_key!r}: "
                               "not the official file; download it again") from None
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise errors.DataError(f"{where} holds images of shape {list(data.shape)} ({data.dtype}), not "
                               "N x 3072 bytes: not the official file; download it again")
    if labels.shape != (len(data),):
        raise errors.DataError(f"{where} holds {len(data)} images but {labels.size} labels: not the "
                               "official file; download it again")
    _check_labels(labels, classes, where)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def read_cifar(source, members, label_key, classes):
    """Images and labels from CIFAR python batches in a .tar.gz or an extracted folder.

    Args:
        source: the official tarball or the folder it extracts to.
        members: batch names inside it (e.g. ["data_batch_1", ...]).
        label_key: b"labels" (CIFAR-10) or b"fine_labels" (CIFAR-100).
        classes: the number of classes (labels are checked to lie below it).
    """
    parts = []
    if os.path.isdir(source):
        for member in members:
            with open(os.path.join(source, member), "rb") as f:
                parts.append(_cifar_batch(f.read(), label_key, os.path.join(source, member), classes))
    else:
        with tarfile.open(source, "r:gz") as tar:
            by_name = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            for member in members:
                if member not in by_name:
                    raise errors.DataError(f"{source} has no member {member}: not the official archive")
                parts.append(_cifar_batch(tar.extractfile(by_name[member]).read(), label_key,
                                          f"{member} in {source}", classes))
    return ArrayDataset(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def read_idx(path):
    """A numpy array from an idx file (MNIST's format), gzipped or not."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise errors.DataError(f"{path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise errors.DataError(f"{path} is truncated: {data.size} of {int(np.prod(shape))} values")
    return data.reshape(shape)


# --------------------------------------------------------------------------- datasets

def _paddle_cache(module):
    return os.path.join(os.path.expanduser("~"), ".cache", "paddle", "dataset", module)


def _candidates(data_path, subdirs, module):
    """Folders searched for a dataset: --data_path, its per-dataset subfolders, Paddle's cache."""
    return [data_path] + [os.path.join(data_path, s) for s in subdirs] + [_paddle_cache(module)]


def _find(folders, names):
    """The first folder holding any of `names` (tried in order), as a path, or None."""
    for folder in folders:
        for name in names:
            path = os.path.join(folder, name)
            if os.path.exists(path):
                return path
    return None


def _paddle_download(cls_name):
    """Try Paddle's standard download into its cache, quietly; None if it worked, else why not
    (one short line)."""
    import paddle.vision.datasets as pd

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            getattr(pd, cls_name)(mode="test", download=True)
            getattr(pd, cls_name)(mode="train", download=True)
        return None
    except Exception as e:  # no network, a proxy, a partial file: Paddle raises many types
        reason = " ".join(str(e).split())[:120]
        return f"{type(e).__name__}: {reason}" if reason else type(e).__name__


def _missing(name, wanted, folders, download, failure):
    """The one-line DataError for dataset `name` found in none of `folders`."""
    tried = ("Paddle's download was not tried (--no_download)" if not download
             else f"Paddle's download failed ({failure})")
    return errors.DataError(f"{name} not found: looked for {wanted} in {', '.join(folders)}; "
                            f"{tried}. Get the official files from {SOURCES[name]} and put them "
                            f"in {folders[0]} (the --data_path folder)")


CIFAR = {
    "CIFAR10": dict(archive="cifar-10-python.tar.gz", folder="cifar-10-batches-py",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    label_key=b"labels", paddle="Cifar10", classes=10),
    "CIFAR100": dict(archive="cifar-100-python.tar.gz", folder="cifar-100-python",
                     train=["train"], test=["test"], label_key=b"fine_labels",
                     paddle="Cifar100", classes=100),
}
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}
IDX = {
    "MNIST": dict(subdirs=["mnist", "MNIST/raw"], module="mnist", paddle="MNIST"),
    "FashionMNIST": dict(subdirs=["fashionmnist", "FashionMNIST/raw", "fashion-mnist"],
                         module="fashion-mnist", paddle="FashionMNIST"),
}
# Where the official files are published.
SOURCES = {"CIFAR10": "https://www.cs.toronto.edu/~kriz/cifar.html",
           "CIFAR100": "https://www.cs.toronto.edu/~kriz/cifar.html",
           "MNIST": "https://yann.lecun.com/exdb/mnist/",
           "FashionMNIST": "https://github.com/zalandoresearch/fashion-mnist"}
AUGMENT = {"CIFAR10": Augment(pad=4, flip=True), "CIFAR100": Augment(pad=4, flip=True),
           "MNIST": Augment(), "FashionMNIST": Augment(), "digits": Augment(pad=1)}


def names():
    """Dataset names accepted by `load_dataset` (case-insensitive)."""
    return ["CIFAR10", "CIFAR100", "MNIST", "FashionMNIST", "digits"]


def canonical_name(name):
    """The listed spelling of dataset `name`; DataError listing the valid names."""
    by_lower = {n.lower(): n for n in names()}
    key = name.lower().replace("-", "").replace("_", "")
    if key not in by_lower:
        raise errors.DataError(f"unknown dataset {name!r}; choose one of: {', '.join(names())}")
    return by_lower[key]


def _load_cifar(name, data_path, download):
    spec = CIFAR[name]
    folders = _candidates(data_path, [name.lower()], "cifar")
    source = _find(folders, [spec["archive"], spec["folder"]])
    failure = _paddle_download(spec["paddle"]) if source is None and download else None
    if source is None and download and failure is None:
        source = _find(folders, [spec["archive"]])
    if source is None:
        raise _missing(name, f"{spec['archive']} (or its extracted {spec['folder']}/)", folders,
                       download, failure or "it left no file there")
    try:
        train = read_cifar(source, spec["train"], spec["label_key"], spec["classes"])
        test = read_cifar(source, spec["test"], spec["label_key"], spec["classes"])
    except (OSError, EOFError, KeyError, ValueError, tarfile.TarError) as e:
        raise errors.DataError(f"{source} is unreadable or not the official {name} file "
                               f"({type(e).__name__}: {e}); download it again") from None
    return train, test, spec["classes"]


def _load_idx(name, data_path, download):
    spec = IDX[name]
    folders = _candidates(data_path, spec["subdirs"], spec["module"])

    def locate():
        for folder in folders:
            found = {}
            for key, base in IDX_FILES.items():
                path = _find([folder], [base + ".gz", base])
                if path:
                    found[key] = path
            if len(found) == len(IDX_FILES):
                return found
        return None

    files = locate()
    failure = _paddle_download(spec["paddle"]) if files is None and download else None
    if files is None and download and failure is None:
        files = locate()
    if files is None:
        wanted = ", ".join(base + ".gz" for base in IDX_FILES.values())
        raise _missing(name, wanted, folders, download, failure or "it left no file there")
    arrays = {key: _read_idx_file(name, path) for key, path in files.items()}
    _check_idx(files, arrays)
    split = {s: ArrayDataset(arrays[f"{s}_images"][..., None], arrays[f"{s}_labels"].astype(np.int64))
             for s in ("train", "test")}
    return split["train"], split["test"], 10


def _read_idx_file(name, path):
    """read_idx, with a file that cannot be read named in a DataError."""
    try:
        return read_idx(path)
    # A damaged .gz fails in the gzip header (BadGzipFile), its checksum or length (OSError,
    # EOFError), or in the compressed data itself (zlib.error, which is no OSError).
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise errors.DataError(f"{path} is unreadable or not the official {name} file "
                               f"({type(e).__name__}: {e}); download it again") from None


def _check_idx(files, arrays):
    """DataError unless the idx arrays are N x height x width images with N labels in 0..9 per
    split, and the test images have the training images' size."""
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1:
            raise errors.DataError(f"{files[split + '_images']} holds an array of shape {list(images.shape)} "
                                   f"and {files[split + '_labels']} one of {list(labels.shape)}; expected "
                                   "N x height x width images and N labels: not the official files")
        if len(images) != len(labels):
            raise errors.DataError(f"{files[split + '_images']} and {files[split + '_labels']} "
                                   "hold different numbers of examples")
        _check_labels(labels, 10, files[split + "_labels"])
    train, test = arrays["train_images"].shape[1:], arrays["test_images"].shape[1:]
    if train != test:  # the models pool adaptively: another size would be scored, silently
        raise errors.DataError(f"{files['test_images']} holds {test[0]}x{test[1]} images but "
                               f"{files['train_images']} {train[0]}x{train[1]}: the test and training "
                               "files are of different datasets; put the official pair in --data_path")


def _load_digits():
    with np.load(DIGITS_FILE) as f:
        # Pixels are counts 0..16; scale to 0..255 so every dataset shares one uint8 path.
        train, test = (ArrayDataset((f[f"{s}_images"].astype(np.uint16) * 255 // 16)
                                    .astype(np.uint8)[..., None], f[f"{s}_labels"].astype(np.int64))
                       for s in ("train", "test"))
    return train, test, 10


def raw_test_images(ds):
    """The test images as their files hold them (uint8, N x H x W x C), at the dataset's raw
    pixel scale `pixel_max(ds.name)`: what an exported model takes."""
    if ds.name != "digits":
        return ds.test.images
    with np.load(DIGITS_FILE) as f:
        return f["test_images"][..., None]


def pixel_max(name):
    """The largest raw pixel value of dataset `name`'s files: 16 for digits' counts, else 255."""
    return 16 if name == "digits" else 255


def channel_statistics(images):
    """Per-channel mean and std of uint8 images scaled to [0, 1], from 256-bin histograms
    (exact, and without a float copy of the whole dataset)."""
    levels = np.arange(256) / 255.0
    mean, std = [], []
    for c in range(images.shape[-1]):
        counts = np.bincount(images[..., c].ravel(), minlength=256)
        m = counts @ levels / counts.sum()
        mean.append(m)
        std.append(np.sqrt(counts @ (levels - m) ** 2 / counts.sum()))
    return np.array(mean, np.float32), np.maximum(np.array(std, np.float32), 1e-3)


def load_dataset(name, data_path="data", download=True):
    """Load dataset `name` (case-insensitive) into memory.

    Args:
        name: CIFAR10, CIFAR100, MNIST, FashionMNIST or digits.
        data_path: folder holding the official files (also searched: its subfolder named
            after the dataset, torchvision's layout, and Paddle's cache).
        download: if the files are absent, try Paddle's standard download first.

    Returns:
        A `Data` with uint8 train/test arrays, class count, normalisation and augmentation.

    Raises:
        DataError: unknown name, files missing or unreadable (the message names them).
    """
    name = canonical_name(name)
    if name in CIFAR:
        train, test, classes = _load_cifar(name, data_path, download)
    elif name in IDX:
        train, test, classes = _load_idx(name, data_path, download)
    else:
        train, test, classes = _load_digits()
    mean, std = channel_statistics(train.images)
    return Data(name, train, test, classes, mean, std, AUGMENT[name],
                fingerprint=fingerprint(train, test))


def fingerprint(train, test):
    """Sizes and a cheap digest of a dataset as read (all labels, every 97th image): a run
    resumed on other files (more images, other labels, another CIFAR file) is told apart."""
    digest = hashlib.sha256()
    for part in (train, test):
        digest.update(np.ascontiguousarray(part.labels).tobytes())
        digest.update(np.ascontiguousarray(part.images[::97]).tobytes())
    return {"train": len(train), "test": len(test), "digest": digest.hexdigest()[:16]}


def split_validation(ds, size, seed):
    """`ds` with `size` training images held out as `ds.val`: chosen at random from `seed` (so
    the same on every process and on resume), stratified by class (each class gives its share
    of `size`, rounded by largest remainder), the rest kept in their order as `ds.train`, whose
    normalisation statistics are recomputed without the held-out images.

    Raises:
        DataError: `size` leaves no training image of some class, or none at all.
    """
    labels = ds.train.labels
    if size >= len(labels):
        raise errors.DataError(f"--val_size {size} is not below the {len(labels)} training images "
                               f"of {ds.name}; hold out fewer")
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * size / len(labels)
    share = np.floor(quota).astype(np.int64)
    share[np.argsort(-(quota - share), kind="stable")[:size - share.sum()]] += 1
    if np.any(share >= counts):
        c = classes[np.argmax(share >= counts)]
        raise errors.DataError(f"--val_size {size} would leave no training image of class {c} "
                               f"of {ds.name}; hold out fewer")
    rng = np.random.default_rng([seed, 104729])  # a stream of its own, apart from batch order
    held = np.concatenate([rng.choice(np.flatnonzero(labels == c), n, replace=False)
                           for c, n in zip(classes, share)])
    keep = np.setdiff1d(np.arange(len(labels)), held)
    held = np.sort(held)
    train = ArrayDataset(ds.train.images[keep], labels[keep])
    mean, std = channel_statistics(train.images)
    return dataclasses.replace(ds, train=train, val=ArrayDataset(ds.train.images[held], labels[held]),
                               mean=mean, std=std)


def as_trained(ds, val_size, seed, normalization=None):
    """`ds` as a run trained on it: `val_size` images held out (`split_validation`, whose
    statistics then normalise), or the per-channel `normalization` (mean, std) given, if it
    has one value per channel."""
    if val_size:  # before normalising: the statistics are the remaining images'
        ds = split_validation(ds, val_size, seed)
    if normalization and len(normalization[0]) == ds.image_shape[0]:
        mean, std = normalization
        ds = dataclasses.replace(ds, mean=np.array(mean, np.float32), std=np.array(std, np.float32))
    return ds


def with_label_noise(dataset, fraction, num_classes, seed):
    """A copy of `dataset` in which round(fraction * N) labels, chosen at random, are replaced
    by another class chosen at random (reproducible from `seed`)."""
    rng = np.random.default_rng([seed, 7919])  # a stream of its own, apart from batch order
    labels = dataset.labels.copy()
    chosen = rng.choice(len(labels), size=int(round(fraction * len(labels))), replace=False)
    shift = rng.integers(1, num_classes, size=len(chosen))  # never 0: always another class
    labels[chosen] = (labels[chosen] + shift) % num_classes
    return ArrayDataset(dataset.images, labels)


# --------------------------------------------------------------------------- batches

class Batches:
    """Callable giving the batches of one epoch as paddle tensors `(x, y)`.

    Args:
        dataset: an ArrayDataset.
        batch_size: samples per batch (per process when sharded).
        mean, std: per-channel normalisation of images scaled to [0, 1].
        shuffle: a new order every epoch (a function of seed and epoch).
        augment: an Augment (random crop / flip), or None.
        seed: base seed of the order and the augmentation.
        rank, world_size: this process's shard of every epoch.
        even_shards: pad the order (repeating samples) so every rank runs the same number of
            batches, as data-parallel training needs; without it each sample is seen exactly
            once over all ranks, as evaluation and the BatchNorm refresh need.
        num_workers: background threads assembling batches ahead of the steps (0: none, they
            are assembled in the loop); None: one where the steps overlap with loading
            (`steps_overlap`: a GPU), none on a CPU.

    Example:
        >>> for x, y in batches(epoch=3, start=10): ...   # epoch 3 from its 11th batch
    """

    def __init__(self, dataset, batch_size, mean, std, shuffle=False, augment=None, seed=0,
                 rank=0, world_size=1, even_shards=False, num_workers=None):
        self.dataset, self.batch_size = dataset, batch_size
        self.scale = (1.0 / (255.0 * np.asarray(std, np.float32))).astype(np.float32)
        self.shift = (np.asarray(mean, np.float32) / np.asarray(std, np.float32)).astype(np.float32)
        self.shuffle, self.augment, self.seed = shuffle, augment or Augment(), seed
        self.rank, self.world_size, self.even_shards = rank, world_size, even_shards
        self.num_workers = num_workers

    def shard_size(self):
        n = len(self.dataset)
        if self.even_shards:
            return -(-n // self.world_size)
        return len(range(self.rank, n, self.world_size))

    def __len__(self):
        return -(-self.shard_size() // self.batch_size)

    def plan(self, epoch, stream=0):
        """Sample indices of this rank and per-sample crop offsets and flips for `epoch`.

        `stream` selects an independent draw for the same epoch (e.g. for a BatchNorm
        refresh pass that should not repeat the training order).
        """
        n = len(self.dataset)
        rng = np.random.default_rng([self.seed, epoch, stream])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        pad = self.augment.pad
        offsets = rng.integers(0, 2 * pad + 1, size=(n, 2)) if pad else None
        flips = rng.random(n) < 0.5 if self.augment.flip else None
        if self.even_shards:
            total = self.shard_size() * self.world_size
            order = np.resize(order, total)  # repeats the start of the order, like DistributedSampler
        return order[self.rank::self.world_size], offsets, flips

    def assemble(self, plan, step):
        """Batch `step` of `plan` as float32 NCHW images and int64 labels (numpy)."""
        order, offsets, flips = plan
        idx = order[step * self.batch_size:(step + 1) * self.batch_size]
        crops = self.crops(idx, offsets, flips)
        # The float32 operations of `crops.astype(float32) * scale - shift`, one at a time (numpy
        # never fuses them): every value bit-identical to it, without the temporary arrays.
        x = np.multiply(crops, self.scale[:, None, None], dtype=np.float32)
        np.subtract(x, self.shift[:, None, None], out=x)
        return x, self.dataset.labels[idx]

    def crops(self, idx, offsets, flips):
        """The images `idx` as uint8 (N, C, H, W): each the crop at its `offsets` of the image
        zero-padded by `augment.pad` pixels, mirrored left to right where `flips` says."""
        images = self.dataset.images
        (height, width, channels), pad, n = images.shape[1:], self.augment.pad, len(idx)
        # Padded per batch, not once for the dataset (CIFAR's would take 240 MB more), and
        # channels first, so that every crop is C x H rows of W contiguous bytes.
        padded = np.zeros((n, channels, height + 2 * pad, width + 2 * pad), np.uint8)
        padded[:, :, pad:pad + height, pad:pad + width] = images[idx].transpose(0, 3, 1, 2)
        if offsets is None and flips is None:
            return padded
        rows, cols = (offsets[idx, 0], offsets[idx, 1]) if offsets is not None else (0, 0)
        rows, cols = np.broadcast_to(rows, n), np.broadcast_to(cols, n)
        # Every crop of every image as a view (N, C, rows, cols, H, W): one fancy index copies
        # the chosen crops, a whole image at a time.
        windows = sliding_window_view(padded, (height, width), axis=(2, 3))
        samples = np.arange(n)
        if flips is None:
            return windows[samples, :, rows, cols]
        flip = flips[idx]
        # A mirrored crop at column c is the crop at 2 * pad - c of the mirrored image, which
        # a view with a negative stride gives without a copy.
        mirrored = sliding_window_view(padded[..., ::-1], (height, width), axis=(2, 3))
        crops = np.empty((n, channels, height, width), np.uint8)
        keep = ~flip
        crops[keep] = windows[samples[keep], :, rows[keep], cols[keep]]
        crops[flip] = mirrored[samples[flip], :, rows[flip], 2 * pad - cols[flip]]
        return crops

    def __call__(self, epoch=0, start=0, stream=0):
        """Iterate over the batches of `epoch` from batch `start` on."""
        import paddle

        plan = self.plan(epoch, stream)
        steps = range(start, len(self))
        workers = int(steps_overlap()) if self.num_workers is None else self.num_workers
        arrays = (self._ahead(plan, steps, workers) if workers
                  else (self.assemble(plan, step) for step in steps))
        with contextlib.closing(arrays):
            for x, y in arrays:
                # Tensors are made in the thread that runs the steps, never in a worker: Paddle
                # does not document its tensor creation as safe from other threads.
                yield paddle.to_tensor(x), paddle.to_tensor(y)

    def _ahead(self, plan, steps, workers):
        """The arrays of `steps` in order, assembled by `workers` threads up to 2 * workers
        batches ahead of the one taken: numpy releases the GIL in its copies and arithmetic,
        so they are assembled while the caller's step runs."""
        pool = ThreadPoolExecutor(workers, thread_name_prefix="batches", initializer=_yield_to_steps)
        pending = deque()
        try:
            for step in steps:
                pending.append(pool.submit(self.assemble, plan, step))
                if len(pending) > 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            # Left early (a signal stopped training, a step or an assembly raised): batches not
            # begun are dropped and the few under way finish, so no thread outlives the epoch.
            pool.shutdown(wait=True, cancel_futures=True)


def _yield_to_steps():
    """Give the calling worker thread the lowest priority (Linux, where threads have their
    own): woken when a batch is taken, an equal thread was put on the step's core and
    preempted it, which cost the step most of the time the overlap saved (docs/performance.md,
    "The data loader"). At nice 19 it runs while the step waits, or on an idle core."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def steps_overlap():
    """Whether Paddle runs on a device that queues the steps' work (a GPU, an XPU...), so that
    the host is free to assemble the next batch meanwhile; on a CPU it is not (measured in
    docs/performance.md, "The data loader")."""
    import paddle

    return paddle.device.get_device() != "cpu"


def refresh_batches(ds, batch_size, seed, epoch, rank=0, world_size=1, num_workers=None):
    """The batches of train.py's BatchNorm refresh after 0-based `epoch`: every training sample
    once over all ranks, in an order and augmentation of their own (stream 1 of the epoch),
    not training's. eval.py and the scripts draw the same ones from a checkpoint."""
    batches = Batches(ds.train, batch_size, ds.mean, ds.std, shuffle=True, augment=ds.augment,
                      seed=seed, rank=rank, world_size=world_size, num_workers=num_workers)
    return batches(epoch, stream=1)
