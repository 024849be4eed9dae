"""The batch loader (data.Batches) against the batches written out sample by sample in numpy."""
import numpy as np
import pytest

from harness import data


def scaling(mean, std):
    """The per-channel float32 scale and shift the loader has always normalised with."""
    std32, mean32 = np.asarray(std, np.float32), np.asarray(mean, np.float32)
    return (1.0 / (255.0 * std32)).astype(np.float32), (mean32 / std32).astype(np.float32)


def reference_batches(images, labels, batch_size, mean, std, augment, shuffle, seed, epoch,
                      stream=0):
    """An epoch's batches as the loader defines them, one sample at a time: the epoch's draws
    from numpy's generator seeded [seed, epoch, stream] (the order, then crop offsets, then
    flips), each image zero-padded, cropped, mirrored, then `x * scale - shift` in float32."""
    n, height, width = len(labels), images.shape[1], images.shape[2]
    pad = augment.pad
    rng = np.random.default_rng([seed, epoch, stream])
    order = rng.permutation(n) if shuffle else np.arange(n)
    offsets = rng.integers(0, 2 * pad + 1, size=(n, 2)) if pad else np.zeros((n, 2), np.int64)
    flips = rng.random(n) < 0.5 if augment.flip else np.zeros(n, bool)
    scale, shift = scaling(mean, std)
    batches = []
    for first in range(0, n, batch_size):
        xs = []
        for i in order[first:first + batch_size]:
            padded = np.pad(images[i], ((pad, pad), (pad, pad), (0, 0)))
            top, left = offsets[i]
            crop = padded[top:top + height, left:left + width]
            if flips[i]:
                crop = crop[:, ::-1]
            xs.append((crop.astype(np.float32) * scale - shift).transpose(2, 0, 1))
        batches.append((np.stack(xs), labels[order[first:first + batch_size]]))
    return batches


def assert_bit_identical(batches, expected):
    assert len(batches) == len(expected)
    for (x, y), (ex, ey) in zip(batches, expected):
        assert x.dtype == np.float32 and x.shape == ex.shape
        assert x.tobytes() == ex.tobytes()  # every bit: -0.0 is not 0.0 here
        np.testing.assert_array_equal(y, ey)


def as_numpy(batches):
    return [(x.numpy(), y.numpy()) for x, y in batches]


CASES = {  # image shape, augmentation: the datasets' own, and odd sizes
    "cifar": ((32, 32, 3), data.Augment(pad=4, flip=True)),
    "digits": ((8, 8, 1), data.Augment(pad=1)),
    "mnist": ((28, 28, 1), data.Augment()),
    "flip only, odd size": ((7, 5, 2), data.Augment(flip=True)),
    "pad wider than the image": ((3, 4, 3), data.Augment(pad=5, flip=True)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_are_bit_identical_to_padding_cropping_flipping_each_sample_in_numpy(case, shuffle):
    shape, augment = CASES[case]
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (150, *shape), dtype=np.uint8)
    labels = rng.integers(0, 10, 150)
    mean, std = rng.uniform(0.2, 0.6, shape[-1]), rng.uniform(0.1, 0.4, shape[-1])
    loader = data.Batches(data.ArrayDataset(images, labels), 32, mean, std, shuffle=shuffle,
                          augment=augment, seed=11)
    expected = reference_batches(images, labels, 32, mean, std, augment, shuffle, 11, epoch=3)
    assert_bit_identical(as_numpy(loader(epoch=3)), expected)  # 4 batches of 32 and one of 22
    assert_bit_identical(as_numpy(loader(epoch=3, start=2)), expected[2:])  # a resumed epoch
    refresh = reference_batches(images, labels, 32, mean, std, augment, shuffle, 11, 3, stream=1)
    assert_bit_identical(as_numpy(loader(epoch=3, stream=1)), refresh)


def test_normalisation_is_bit_identical_to_the_float32_formula_for_every_pixel_value_and_channel():
    values = np.arange(256, dtype=np.uint8)
    # One image of 16 x 16 pixels per channel order: every value in every channel.
    images = np.stack([np.roll(values, 85 * k).reshape(16, 16) for k in range(3)], axis=-1)[None]
    mean, std = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]  # CIFAR-10's, float64
    x, _ = next(iter(data.Batches(data.ArrayDataset(images, np.zeros(1, np.int64)), 1, mean,
                                  std)()))
    scale, shift = scaling(mean, std)
    for c in range(3):
        expected = images[0, :, :, c].astype(np.float32) * scale[c] - shift[c]
        assert x.numpy()[0, c].tobytes() == expected.tobytes()

