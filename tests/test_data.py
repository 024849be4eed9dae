"""Dataset readers on tiny files in the official formats, and the batch loader."""
import os

import numpy as np
import pytest

from harness import errors

from harness import data
from helpers import one_line_error, run_main, write_cifar10, write_cifar100, write_mnist


@pytest.mark.parametrize("extracted", [False, True])
def test_cifar10_reads_official_batches(tmp_path, extracted):
    batches = write_cifar10(str(tmp_path), per_batch=7, extracted=extracted)
    ds = data.load_dataset("cifar10", str(tmp_path), download=False)
    assert ds.name == "CIFAR10" and ds.num_classes == 10
    assert ds.train.images.shape == (35, 32, 32, 3) and ds.test.images.shape == (7, 32, 32, 3)
    first = batches["data_batch_1"][b"data"][0]
    # Rows are 1024 red, then green, then blue values, row-major.
    np.testing.assert_array_equal(ds.train.images[0, :, :, 1], first[1024:2048].reshape(32, 32))
    np.testing.assert_array_equal(ds.test.labels, batches["test_batch"][b"labels"])
    assert ds.augment == data.Augment(pad=4, flip=True)


def test_cifar10_found_in_torchvision_style_subfolder(tmp_path):
    write_cifar10(str(tmp_path / "cifar10"), per_batch=3)
    assert len(data.load_dataset("CIFAR10", str(tmp_path), download=False).train) == 15


def test_cifar100_uses_fine_labels(tmp_path):
    batches = write_cifar100(str(tmp_path), count=9)
    ds = data.load_dataset("Cifar100", str(tmp_path), download=False)
    assert ds.num_classes == 100
    np.testing.assert_array_equal(ds.train.labels, batches["train"][b"fine_labels"])


def test_mnist_reads_idx_gz(tmp_path):
    arrays = write_mnist(str(tmp_path), train=12, test=5)
    ds = data.load_dataset("MNIST", str(tmp_path), download=False)
    assert ds.train.images.shape == (12, 28, 28, 1)
    np.testing.assert_array_equal(ds.train.images[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test.labels, arrays["t10k-labels-idx1-ubyte"])
    assert ds.mean.shape == (1,)
    expected_mean = arrays["train-images-idx3-ubyte"].mean() / 255.0
    assert ds.mean[0] == pytest.approx(expected_mean, rel=1e-5)


def test_digits_is_embedded_with_a_fixed_split():
    ds = data.load_dataset("DIGITS")
    assert (len(ds.train), len(ds.test)) == (1438, 359)
    assert ds.image_shape == (1, 8, 8)
    assert sorted(np.unique(ds.test.labels)) == list(range(10))


@pytest.mark.parametrize("name, message", [
    ("CIFAR10", "cifar-10-python.tar.gz"),
    ("MNIST", "train-images-idx3-ubyte.gz"),
    ("ImageNet", "choose one of"),
])
def test_missing_or_unknown_dataset_is_named(tmp_path, name, message):
    with pytest.raises(errors.DataError, match=message):
        data.load_dataset(name, str(tmp_path), download=False)


def test_corrupt_files_are_named(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(errors.DataError, match="cifar-10-python.tar.gz is unreadable"):
        data.load_dataset("CIFAR10", str(tmp_path), download=False)
    write_mnist(str(tmp_path))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(errors.DataError, match="MNIST"):
        data.load_dataset("MNIST", str(tmp_path), download=False)


def _mnist_error(tmp_path):
    import train

    return run_main(train.main, "--dataset", "MNIST", "--data_path", tmp_path / "data", "--model",
                    "SimpleCNN", "--no_download", "--dir", tmp_path / "run")


def test_mnist_test_images_of_another_size_are_refused_naming_both_files(tmp_path):
    write_mnist(str(tmp_path / "data"), train=6, test=4, test_side=12)
    one_line_error(_mnist_error(tmp_path), "t10k-images-idx3-ubyte.gz holds 12x12 images",
                   "train-images-idx3-ubyte.gz 28x28")
    assert not (tmp_path / "run").exists()


def test_mnist_gz_with_corrupt_compressed_data_is_one_line_naming_it(tmp_path):
    write_mnist(str(tmp_path / "data"), train=6, test=4)
    path = tmp_path / "data" / "t10k-labels-idx1-ubyte.gz"
    # A valid gzip header (no flags), then a deflate block of the reserved type: zlib refuses
    # the data itself (not a checksum or length at the end).
    path.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\xff" * 32)
    one_line_error(_mnist_error(tmp_path), f"{path} is unreadable", "while decompressing data", "download it again")
    assert not (tmp_path / "run").exists()


def _loader(n=50, **kwargs):
    images = np.arange(n * 6 * 6, dtype=np.int64).reshape(n, 6, 6, 1) % 256
    ds = data.ArrayDataset(images.astype(np.uint8), np.arange(n))
    return data.Batches(ds, 8, mean=[0.0], std=[1.0 / 255.0], **kwargs)


def test_batches_cover_each_sample_once_and_resume_mid_epoch():
    loader = _loader(shuffle=True, seed=3)
    labels = [y.numpy() for _, y in loader(epoch=2)]
    assert sorted(np.concatenate(labels)) == list(range(50))
    assert [len(b) for b in labels] == [8] * 6 + [2]
    rest = [y.numpy() for _, y in loader(epoch=2, start=4)]
    np.testing.assert_array_equal(np.concatenate(rest), np.concatenate(labels[4:]))
    other_epoch = np.concatenate([y.numpy() for _, y in loader(epoch=3)])
    assert not np.array_equal(other_epoch, np.concatenate(labels))


def test_augmentation_is_a_padded_crop_or_flip_of_the_image():
    loader = _loader(shuffle=False, augment=data.Augment(pad=2, flip=True), seed=0)
    x, y = next(iter(loader(epoch=0)))
    images = loader.dataset.images[..., 0].astype(np.float32)
    for crop, label in zip(x.numpy()[:, 0], y.numpy()):
        padded = np.pad(images[label], 2)
        views = [padded[i:i + 6, j:j + 6] for i in range(5) for j in range(5)]
        views += [v[:, ::-1] for v in views]
        assert any(np.array_equal(crop, v) for v in views)


@pytest.mark.parametrize("world", [2, 3])
def test_shards_split_each_epoch_exactly_or_evenly(world):
    exact = [np.concatenate([y.numpy() for _, y in _loader(n=25, shuffle=True, rank=r,
                                                           world_size=world)(epoch=1)])
             for r in range(world)]
    assert sorted(np.concatenate(exact)) == list(range(25))
    even = [_loader(n=25, shuffle=True, rank=r, world_size=world, even_shards=True)
            for r in range(world)]
    assert len({len(loader) for loader in even}) == 1
    seen = np.concatenate([np.concatenate([y.numpy() for _, y in loader(epoch=1)]) for loader in even])
    assert set(seen) == set(range(25)) and len(seen) == even[0].shard_size() * world


def test_worker_threads_give_the_same_batches():
    plain = [x.numpy() for x, _ in _loader(shuffle=True, augment=data.Augment(pad=1))(epoch=0)]
    threaded = [x.numpy() for x, _ in _loader(shuffle=True, augment=data.Augment(pad=1),
                                               num_workers=2)(epoch=0)]
    for a, b in zip(plain, threaded, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_missing_dataset_names_the_folders_searched_the_download_and_where_to_get_it(tmp_path,
                                                                                      monkeypatch):
    import paddle.vision.datasets as paddle_datasets

    with pytest.raises(errors.DataError) as refused:
        data.load_dataset("CIFAR10", str(tmp_path), download=False)
    message = str(refused.value)
    assert str(tmp_path) in message and os.path.join(str(tmp_path), "cifar10") in message
    assert "not tried (--no_download)" in message and "https://www.cs.toronto.edu/~kriz/cifar.html" in message

    def offline(*args, **kwargs):
        raise ConnectionError("Name or service not known")
    monkeypatch.setattr(paddle_datasets, "MNIST", offline)
    with pytest.raises(errors.DataError) as refused:
        data.load_dataset("MNIST", str(tmp_path), download=True)
    message = str(refused.value)
    assert "Paddle's download failed (ConnectionError: Name or service not known)" in message
    assert "\n" not in message and "t10k-images-idx3-ubyte.gz" in message


def test_train_py_leaves_the_loaders_choice_to_batches_unless_told(tmp_path, monkeypatch):
    import train

    seen = []
    original = data.Batches.__init__

    def recording(self, *args, **kwargs):
        seen.append(kwargs.get("num_workers"))
        original(self, *args, **kwargs)
    monkeypatch.setattr(data.Batches, "__init__", recording)
    flags = ["--dataset", "digits", "--model", "SimpleCNN", "--epochs", "1", "--no_visualdl"]
    assert run_main(train.main, *flags, "--dir", tmp_path / "a").returncode == 0
    assert seen and set(seen) == {None}  # --num_workers 0: Batches decides (ahead on a GPU)
    seen.clear()
    assert run_main(train.main, *flags, "--num_workers", "2", "--dir", tmp_path / "b").returncode == 0
    assert set(seen) == {2}
