"""Shared test helpers: running the scripts as a user would, and tiny official-format data."""
import contextlib
import gzip
import importlib.util
import io
import os
import pickle
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *args, timeout=300, env=None):
    """Run `python <script> args...` from the repository root; returns CompletedProcess."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def run_main(main, *args):
    """Call a script's `main(argv)` in this process, as `run_script` runs it in another (no
    Paddle start-up per call); returns a CompletedProcess with its exit code and output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own errors and --help
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def finished_run(tmp_path_factory, name, *flags):
    """A run of train.py (in this process) with `flags` in a fresh folder; asserts it finished."""
    import train

    run_dir = tmp_path_factory.mktemp(name) / "run"
    result = run_main(train.main, *flags, "--dir", run_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir, result


def script(name):
    """The module scripts/<name>.py (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_cifar10(folder, per_batch=20, seed=0, extracted=False):
    """The official cifar-10-python.tar.gz layout with `per_batch` images per batch."""
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, per_batch)
        images = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        batches[name] = {b"batch_label": name.encode(), b"labels": labels.tolist(),
                         b"data": images, b"filenames": [b"x.png"] * per_batch}
    _write_tar(folder, "cifar-10-python.tar.gz", "cifar-10-batches-py", batches, extracted)
    return batches


def write_cifar100(folder, count=30, seed=0):
    rng = np.random.default_rng(seed)
    batches = {name: {b"fine_labels": rng.integers(0, 100, count).tolist(),
                      b"coarse_labels": rng.integers(0, 20, count).tolist(),
                      b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8)}
               for name in ("train", "test")}
    _write_tar(folder, "cifar-100-python.tar.gz", "cifar-100-python", batches, False)
    return batches


def _write_tar(folder, archive, inner, batches, extracted):
    os.makedirs(folder, exist_ok=True)
    if extracted:
        os.makedirs(os.path.join(folder, inner), exist_ok=True)
        for name, batch in batches.items():
            with open(os.path.join(folder, inner, name), "wb") as f:
                pickle.dump(batch, f, protocol=2)
        return
    script("run_documented_commands").write_tar(os.path.join(folder, archive), inner, batches)


def _idx(array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(folder, train=40, test=20, seed=0, test_side=28):
    """The four official MNIST idx .gz files (test images of `test_side` pixels square)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (test, test_side, test_side)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, test),
    }
    for name, array in arrays.items():
        with gzip.open(os.path.join(folder, name + ".gz"), "wb") as f:
            f.write(_idx(array))
    return arrays


def checkpoint_tensors(path):
    """Every tensor of a checkpoint as numpy: SGD weights, the average, SWAG's statistics."""
    from harness import checkpoints

    ckpt = checkpoints.load_checkpoint(str(path))
    tensors = {f"{part}/{key}": value.numpy() for part in ("state_dict", "swa_state_dict")
               for key, value in getattr(ckpt, part).items()}
    if ckpt.swag_var_sum is not None:
        tensors["swag/var_sum"] = ckpt.swag_var_sum.numpy()
        tensors.update({f"swag/deviation{i}": d.numpy() for i, d in enumerate(ckpt.swag_deviations)})
    return tensors


def metrics_rows(run_dir):
    """metrics.csv's rows, every column but the timings."""
    from harness import report

    return [{k: v for k, v in row.items() if k not in ("time", "img_s", "wait_pct")}
            for row in report.read_metrics(str(run_dir))]


def snapshot_dir(path):
    """{relative file name: bytes} of everything in `path` but the lock file (which a refused
    command may leave), to show nothing was changed."""
    out = {}
    for base, _, files in os.walk(path):
        for name in files:
            if name == ".lock":
                continue
            full = os.path.join(base, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


def one_line_error(result, *fragments):
    """Assert exit code 2 and a single stderr line (no traceback) containing `fragments`."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script_args, log_dir, nproc=1, nnodes=1, rank=None, port=None, env=None):
    """Start `python -m paddle.distributed.launch ...` in its own process group (Popen)."""
    command = [sys.executable, "-m", "paddle.distributed.launch", "--log_dir", str(log_dir),
               "--nproc_per_node", str(nproc)]
    if port is not None:
        command += ["--master", f"127.0.0.1:{port}"]
    if nnodes > 1:
        command += ["--nnodes", str(nnodes), "--rank", str(rank)]
    return start(command + list(script_args), env=env)


def start(command, env=None, cwd=ROOT):
    """Popen `command` (from the repository root) in its own process group, output captured."""
    return subprocess.Popen([str(a) for a in command], cwd=cwd, env=dict(os.environ, **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(processes, timeout=300):
    """Wait for launched process groups; kill them all if one fails or time runs out."""
    import signal
    outputs = []
    try:
        for p in processes:
            out, _ = p.communicate(timeout=timeout)
            outputs.append(out)
            if p.returncode != 0:
                raise AssertionError(f"launch exited {p.returncode}:\n{out[-3000:]}")
        return outputs
    finally:
        for p in processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
