"""Every pickle we open is read as data only: hostile files of each known kind are refused by
every reader in one line (exit 2) with nothing changed, and mangled real files give a valid
value or a one-line error, never a crash, a traceback or a hang."""
import os
import pickle
import random
import signal

import numpy as np
import paddle
import pytest

import eval as evaluation
import hostile_pickles as hostile
import train
from harness import checkpoints, errors, pickles
from helpers import finished_run, one_line_error, run_main, script, write_cifar10

QUICK = ["--dataset", "digits", "--model", "SimpleCNN", "--epochs", "2", "--swa", "--swa_start", "2",
         "--no_visualdl"]


@pytest.fixture
def deadline():
    """Fail (rather than hang the suite) if a read takes more than a minute."""
    def expire(*_):
        raise AssertionError("a hostile file kept the reader busy for a minute")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _checkpoint_readers(path, tmp_path):
    return [
        (evaluation.main, ["--model_path", path]),
        (evaluation.main, ["--ensemble_of", path, path]),
        (train.main, [*QUICK, "--init", path, "--dir", tmp_path / "a"]),
        (train.main, [*QUICK, "--resume", path, "--dir", tmp_path / "b"]),
        (script("export").main, ["--model_path", path, "--out", tmp_path / "exported"]),
        (script("flatness").main, ["--model_path", path, "--out", tmp_path / "flat"]),
        (script("average_checkpoints").main, [path, "--out", tmp_path / "avg.pdparams"]),
    ]


@pytest.mark.parametrize("kind", hostile.KINDS)
def test_a_hostile_checkpoint_is_refused_by_every_reader_before_anything_runs(kind, tmp_path, deadline):
    marker = tmp_path / "marker"
    path = tmp_path / "given.pdparams"
    path.write_bytes(hostile.checkpoint_bytes(kind, marker))
    for main, argv in _checkpoint_readers(path, tmp_path):
        one_line_error(run_main(main, *argv), "given.pdparams", hostile.REASONS[kind],
                       "refused before building it")
    assert not marker.exists()
    assert sorted(os.listdir(tmp_path)) == ["given.pdparams"]  # no run folder, no output


def _fit_model(tmp_path):
    import callbacks
    import models

    model = paddle.Model(models.build("SimpleCNN", 10, 1))
    model.prepare(paddle.optimizer.SGD(0.1, parameters=model.parameters()))
    model.save(str(tmp_path / "fit"))
    callbacks.SWACallback(swa_start=1).set_model(model)
    return model


@pytest.mark.parametrize("kind", ["forged dtype fields", "attributes on an OrderedDict",
                                  "shared-reference expansion", "deep lists"])
@pytest.mark.parametrize("suffix", [".swa", ".pdparams", ".pdopt", ".pdscaler"])
def test_the_callbacks_load_refuses_a_hostile_file_before_paddle_reads_it(kind, suffix, tmp_path,
                                                                          deadline):
    marker = tmp_path / "marker"
    model = _fit_model(tmp_path)
    (tmp_path / f"fit{suffix}").write_bytes(hostile.checkpoint_bytes(kind, marker))
    with pytest.raises(errors.CheckpointError, match="refused before building it"):
        model.load(str(tmp_path / "fit"))
    assert not marker.exists()


@pytest.mark.parametrize("given", ["fit", "fit.pdparams", "fit.pdopt", "fit.pdmodel"])
def test_the_callbacks_load_checks_the_files_paddle_opens_under_any_name_it_takes(given, tmp_path):
    marker = tmp_path / "marker"
    model = _fit_model(tmp_path)
    (tmp_path / "fit.pdparams").write_bytes(
        pickle.dumps({"fc.weight": hostile.RunsACommand(f"touch {marker}")}, protocol=4))
    with pytest.raises(errors.CheckpointError, match="posix.system"):
        model.load(str(tmp_path / given))
    os.unlink(tmp_path / "fit.pdparams")
    os.mkfifo(tmp_path / "fit.pdparams")  # Paddle would open it and wait
    with pytest.raises(errors.CheckpointError, match="not a regular file"):
        model.load(str(tmp_path / given))
    assert not marker.exists()


@pytest.mark.parametrize("kind", hostile.KINDS)
def test_a_hostile_cifar_batch_is_refused_in_one_line(kind, tmp_path, deadline):
    marker = tmp_path / "marker"
    write_cifar10(tmp_path / "data", per_batch=4, extracted=True)
    (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3").write_bytes(
        hostile.cifar_batch_bytes(kind, marker))
    one_line_error(run_main(train.main, "--dataset", "CIFAR10", "--data_path", tmp_path / "data",
                            "--no_download", "--model", "SimpleCNN", "--epochs", "1",
                            "--dir", tmp_path / "run"),
                   "data_batch_3", hostile.REASONS[kind])
    assert not marker.exists() and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- what still loads

def _state(dtype):
    import models

    model = models.build("SimpleCNN", 10, 1)
    return {k: v.astype(dtype) if v.dtype == paddle.float32 else v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_paddle_saved_state_dicts_read_as_paddle_load_reads_them(tmp_path, dtype, protocol):
    state = _state(dtype)
    path = str(tmp_path / "w.pdparams")
    paddle.save(state, path, protocol=protocol)
    ours, theirs = checkpoints.read_file(path), paddle.load(path)
    assert list(ours) == list(theirs) == list(state)
    for key in state:
        assert ours[key].dtype == theirs[key].dtype, key
        np.testing.assert_array_equal(ours[key].numpy(), theirs[key].numpy())
    nested = str(tmp_path / "ckpt.pdparams")  # tensors inside a checkpoint: no name mapping
    paddle.save({"epoch": 1, "state_dict": state, "optimizer": {}}, nested, protocol=protocol)
    ours, theirs = checkpoints.read_file(nested), paddle.load(nested)
    for key in state:
        assert ours["state_dict"][key].dtype == theirs["state_dict"][key].dtype, key
        np.testing.assert_array_equal(ours["state_dict"][key].numpy(), theirs["state_dict"][key].numpy())


def test_the_original_codes_layout_with_numpy_arrays_and_python2_names_loads(tmp_path):
    """A checkpoint as the earlier Paddle port wrote it: the original PyTorch keys, arrays
    (no tensor pairs), an OrderedDict state dict, protocol 2."""
    import collections

    weights = collections.OrderedDict((k, v.numpy()) for k, v in _state("float32").items())
    legacy = {"epoch": 7, "state_dict": weights, "swa_state_dict": weights, "swa_n": 3,
              "optimizer": {"velocity": [np.ones(3, np.float32)]}}
    path = tmp_path / "legacy.pdparams"
    path.write_bytes(pickle.dumps(legacy, protocol=2))
    ckpt = checkpoints.load_checkpoint(str(path))
    assert (ckpt.epoch, ckpt.swa_n) == (7, 3)
    for key, value in weights.items():
        assert isinstance(ckpt.state_dict[key], paddle.Tensor)
        np.testing.assert_array_equal(ckpt.swa_state_dict[key].numpy(), value)


def test_a_read_value_is_plain_data_with_arrays_of_their_own_memory():
    big_endian = np.arange(6, dtype=">i4").reshape(2, 3)
    fortran = np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3))
    value = {"a": big_endian, "f": fortran, "s": np.float32(1.5), "t": (1, None, "x"), "b": b"\x00"}
    for protocol in range(6):
        read = pickles.read_data(pickle.dumps(value, protocol=protocol))
        assert read["a"].dtype == np.dtype("<i4") and read["a"].flags.owndata
        np.testing.assert_array_equal(read["a"], big_endian)
        assert read["f"].flags.c_contiguous and read["f"].flags.writeable
        np.testing.assert_array_equal(read["f"], fortran)
        assert read["s"] == np.float32(1.5) and read["s"].dtype == np.float32
        assert read["t"] == (1, None, "x") and read["b"] == b"\x00"


def test_shared_parts_are_read_once_and_within_the_files_budget():
    leaf = np.arange(4, dtype=np.float32)
    shared = {"x": [leaf, leaf], "y": [leaf]}
    read = pickles.read_data(pickle.dumps(shared, protocol=4))
    assert read["x"][0] is read["x"][1] is read["y"][0]  # one array, as pickled
    with pytest.raises(pickles.Refused, match="expand"):
        pickles.read_data(pickle.dumps(hostile._shared(5), protocol=4))
    with pytest.raises(pickles.Refused, match="expand"):  # 100,000 lists in 200 KB
        pickles.read_data(hostile._nested_lists(100_000))


# --------------------------------------------------------------------------- mutations

def _mutations(raw, count, seed):
    """`count` random byte flips, truncations and splices of `raw`."""
    rng = random.Random(seed)
    for i in range(count):
        data = bytearray(raw)
        kind = i % 3
        if kind == 0:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1:
            data = data[:rng.randrange(len(data))]
        else:
            a, b = sorted(rng.sample(range(len(data)), 2))
            c = rng.randrange(len(data))
            data = data[:c] + data[a:b] + data[c:]
        yield bytes(data)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    run_dir, _ = finished_run(tmp_path_factory, "mutations", *QUICK, "--epochs", "1",
                              "--swa_start", "1")
    return (run_dir / "checkpoint-1.pdparams").read_bytes()


@pytest.mark.slow
def test_mangled_checkpoints_load_or_give_one_error(small_checkpoint, tmp_path, deadline):
    path = str(tmp_path / "m.pdparams")
    outcomes = {"loaded": 0, "refused": 0}
    for data in _mutations(small_checkpoint, 2000, seed=0):
        with open(path, "wb") as f:
            f.write(data)
        try:
            checkpoints.load_checkpoint(path)
            outcomes["loaded"] += 1
        except errors.CheckpointError as e:
            assert "\n" not in str(e) and path in str(e)
            outcomes["refused"] += 1
    assert outcomes["loaded"] and outcomes["refused"]  # both kinds of outcome were met


def test_mangled_cifar_batches_load_or_give_one_error(tmp_path, deadline):
    from harness import data

    batches = write_cifar10(tmp_path / "data", per_batch=8, extracted=True)
    raw = pickle.dumps(batches["data_batch_1"], protocol=2)
    outcomes = {"loaded": 0, "refused": 0}
    for data_bytes in _mutations(raw, 1500, seed=1):
        (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1").write_bytes(data_bytes)
        try:
            data.load_dataset("CIFAR10", str(tmp_path / "data"), download=False)
            outcomes["loaded"] += 1
        except errors.DataError as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1
    assert outcomes["loaded"] and outcomes["refused"]


# --------------------------------------------------------------------------- the record

def test_the_fields_written_are_the_fields_documented(small_checkpoint, tmp_path):
    import dataclasses
    import re

    # the docstring's table: one field per line, indented 8, its name then its meaning
    documented = re.findall(r"^ {8}(\w+) +\S", checkpoints.Checkpoint.__doc__, re.M)
    fields = [f.name for f in dataclasses.fields(checkpoints.Checkpoint)]
    assert sorted(documented) == sorted(fields)
    path = tmp_path / "c.pdparams"
    path.write_bytes(small_checkpoint)
    assert sorted(checkpoints.read_file(str(path))) == sorted(fields)  # train.py writes each


def _with(small_checkpoint, tmp_path, change):
    """`small_checkpoint` with `change(dict)` applied, written as a new file; its path."""
    path = tmp_path / "c.pdparams"
    path.write_bytes(small_checkpoint)
    data = checkpoints.read_file(str(path))
    change(data)
    paddle.save(data, str(path))
    return path


@pytest.mark.parametrize("change, field", [
    (lambda d: d.update(epoch="abc"), "epoch is not a whole number >= 0"),
    (lambda d: d["args"].update(batch_size=0), "args is not flags with batch_size a whole number >= 1"),
    (lambda d: d["args"].update(batch_size=-3), "args is not flags with batch_size"),
    (lambda d: d.update(args=["--lr_init", "0.1"]), "args is not train.py's flags"),
    (lambda d: d["normalization"].update(mean="a"), "normalization is not a list of finite numbers"),
    (lambda d: d["normalization"].update(std=[0]), "normalization is not a mean and a positive std"),
    (lambda d: d.update(swa_state_dict=[1, 2]), "swa_state_dict is not a state dict"),
    (lambda d: d.update(fge_snapshots=["../../etc/passwd"]), "fge_snapshots is not file names"),
    (lambda d: d.update(rng={"python": (3, (1,), None), "numpy": None}), "rng is not"),
])
def test_a_field_that_is_not_what_the_record_says_is_named_in_one_line(small_checkpoint, tmp_path,
                                                                      change, field):
    path = _with(small_checkpoint, tmp_path, change)
    one_line_error(run_main(evaluation.main, "--model_path", path), "c.pdparams: its " + field)


@pytest.mark.parametrize("change, problem", [
    (lambda d: d.update(format=np.zeros(2)), "is of format"),
    (lambda d: d["state_dict"].update({"fc.bias": ("fc.bias", np.zeros(10, np.uint32))}),
     "holds an array Paddle cannot make a tensor of"),
    (lambda d: d["rng"].update(numpy=("MT19937", d["rng"]["numpy"][1], 2**31 - 1, 0, 0.0)),
     "its rng is not"),
    (lambda d: d["normalization"].update(mean=[np.complex64(1)]), "its normalization is not"),
    (lambda d: d.update(epoch=np.uint64(2**64 - 1)), "its epoch is not"),
    (lambda d: d["args"].update(lr_init=np.zeros(2)), "its args is not"),
])
def test_values_that_would_crash_later_are_refused_when_read(small_checkpoint, tmp_path, change,
                                                             problem):
    path = _with(small_checkpoint, tmp_path, change)
    one_line_error(run_main(evaluation.main, "--model_path", path), "c.pdparams", problem)


def test_a_negative_batchnorm_variance_is_refused_naming_it(small_checkpoint, tmp_path):
    def negative(data):
        key = next(k for k in data["swa_state_dict"] if k.endswith("_variance"))
        data["swa_state_dict"][key] = -paddle.ones_like(data["swa_state_dict"][key])
    path = _with(small_checkpoint, tmp_path, negative)
    one_line_error(run_main(evaluation.main, "--model_path", path), "BatchNorm variance",
                   "_variance is negative")
