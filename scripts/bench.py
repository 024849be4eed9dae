"""Benchmark swa-paddle on this machine (a benchmark, not a test).

    python scripts/bench.py                       # a few minutes on 2 cores
    python scripts/bench.py --models VGG16 --batch_size 128 --repeats 5
    python scripts/bench.py --loader --batch_size 128 --repeats 7      # section 4 only

Prints, with the machine and settings:
  1. train and eval images/s per model: Paddle's defaults against train.py's automatic CPU
     settings (each measured in a fresh process, since MKL reads its settings once);
  2. one SWA averaging step against the numpy memory floor (numpy adding two float32 arrays
     into a third over as many values), and an EMA update (done after every training step)
     as a fraction of a training step; --against REV times utils.py of a git revision beside
     this tree's (each in fresh processes, alternating);
  3. the BatchNorm refresh against one forward pass over the same images, and what an
     intermediate SWA evaluation costs in epochs;
  4. the data loader's images/s against a vectorised numpy reference doing the same work and
     against training's; with --loader, also a training pass with a stand-in step (as a GPU
     leaves the host free) and the quick start's, with batches assembled in the loop and one
     thread ahead, and the share of each pass spent waiting for data;
  5. SWA's own share of a whole run (averaging + final BatchNorm refresh), evaluated only
     at the end, and the wall-clock difference of the same run with and without --swa.
All times are medians of --repeats measurements.
"""
import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import harness  # noqa: E402

harness.prepare()  # before Paddle loads: the math library's path, Paddle's import-time warnings
import numpy as np  # noqa: E402
import paddle  # noqa: E402

import models  # noqa: E402
import utils  # noqa: E402
from harness import cli, data, engine, runtime  # noqa: E402


def median_time(fn, repeats, warmup=1, before=None):
    """The median time of `repeats` calls of `fn`, after `warmup` calls; `before` (untimed) runs
    before each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if before:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cache_evictor():
    """A function that writes twice the last-level cache's size (at least 64 MB), so the next
    call finds its arrays in memory, not in a cache: as an update finds them after a
    training step."""
    try:
        size = os.sysconf("SC_LEVEL3_CACHE_SIZE")
    except (ValueError, OSError):
        size = 0
    block = np.zeros(max(64 << 20, 2 * size), np.uint8)
    return lambda: np.add(block, 1, out=block)


def synthetic_batch(batch_size, channels=3, size=32, seed=0):
    rng = np.random.default_rng(seed)
    x = paddle.to_tensor(rng.standard_normal((batch_size, channels, size, size)).astype("float32"))
    return x, paddle.to_tensor(rng.integers(0, 10, batch_size))


# --------------------------------------------------------------------------- workers

def worker_speed(model_name, batch_size, repeats, settings):
    """Train/eval images/s of one model in this (fresh) process; returns a dict."""
    if settings == "tuned":
        description = runtime.tune_cpu(0, model_name)
    else:
        description = "Paddle's defaults (1 thread, MKL's generic path)"
    model = models.build(model_name)
    optimizer = paddle.optimizer.Momentum(0.01, parameters=model.parameters())
    x, y = synthetic_batch(batch_size)
    batches = [(x, y)]
    train = median_time(lambda: engine.train_pass(batches, model, optimizer, lambda step: 0.01,
                                                  lambda step: step), repeats)
    evaluate = median_time(lambda: engine.evaluate_pass(batches, model), repeats)
    has_bn = any(isinstance(layer, paddle.nn.layer.norm._BatchNormBase) for layer in model.sublayers())
    refresh = median_time(lambda: utils.bn_update(batches, model), repeats) if has_bn else None
    return {"settings": description, "train": batch_size / train, "eval": batch_size / evaluate,
            "bn_refresh": batch_size / refresh if refresh else None}


def worker_run(args_list):
    """Run train.py (as a program, in this process); time SWA's own work (averaging,
    BatchNorm refresh)."""
    import runpy

    spent = {"update": 0.0, "bn_update": 0.0}
    for name in spent:
        original = getattr(utils.SWA, name)

        def timed(self, *a, _original=original, _name=name, **k):
            start = time.perf_counter()
            try:
                return _original(self, *a, **k)
            finally:
                spent[_name] += time.perf_counter() - start
        setattr(utils.SWA, name, timed)
    start = time.perf_counter()
    with open(os.devnull, "w") as sink:
        stdout, sys.stdout = sys.stdout, sink
        try:
            sys.argv = [os.path.join(ROOT, "train.py")] + args_list
            try:
                runpy.run_path(sys.argv[0], run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code
        finally:
            sys.stdout = stdout
    return {"code": code, "total": time.perf_counter() - start, **spent}


def spawn(*worker_args, paddle_defaults=False):
    """Run a worker of this script in a fresh process; returns its JSON result."""
    env = dict(os.environ)
    if paddle_defaults:
        env["MKL_DEBUG_CPU_TYPE"] = ""  # set, so runtime keeps it; empty, so MKL ignores it
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", *map(str, worker_args)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- sections

def machine():
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {runtime.available_cores()} cores; Python {platform.python_version()}, "
            f"Paddle {paddle.__version__}, numpy {np.__version__}")


def section_speed(names, batch_size, repeats, rounds):
    print(f"\n1. Speed (synthetic 32x32x3 images, batch {batch_size}, images/s; each setting in "
          f"{rounds} fresh processes, alternating, median)")
    print(f"{'model':16s} {'setting':9s} {'train':>8s} {'eval':>8s} {'BN pass':>8s}")
    results = {}
    for name in names:
        runs = {"defaults": [], "tuned": []}
        for _ in range(rounds):
            for settings in runs:
                runs[settings].append(spawn("speed", name, batch_size, repeats, settings,
                                            paddle_defaults=settings == "defaults"))
        for settings, samples in runs.items():
            r = dict(samples[0])
            for key in ("train", "eval", "bn_refresh"):
                r[key] = statistics.median(s[key] for s in samples) if r[key] else None
            results[(name, settings)] = r
            bn = f"{r['bn_refresh']:8.1f}" if r["bn_refresh"] else f"{'-':>8s}"
            print(f"{name:16s} {settings:9s} {r['train']:8.1f} {r['eval']:8.1f} {bn}")
        d, t = results[(name, "defaults")], results[(name, "tuned")]
        print(f"{'':16s} {'speed-up':9s} {t['train'] / d['train']:7.2f}x {t['eval'] / d['eval']:7.2f}x"
              f"   ({t['settings']})")
    return results


def torch_foreach_ms(count_shapes, repeats):
    """torch's AveragedModel-style multi-tensor update (_foreach_lerp_) over tensors of the same
    shapes, in ms, where torch is installed (an optional column); None otherwise."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    averages = [torch.zeros(shape) for shape in count_shapes]
    models_ = [torch.ones(shape) for shape in count_shapes]
    return 1e3 * median_time(lambda: torch._foreach_lerp_(averages, models_, 0.1), repeats, warmup=2)


def load_core(revision):
    """utils.py of this tree (revision None), or of a git revision of it: the averaging
    updates of two versions, timed alike."""
    return utils if revision is None else load_at(revision, "utils.py")


def load_at(revision, path):
    """The module at `path` of git `revision` (read with git show, imported under another
    name beside this tree's)."""
    import importlib.util

    source = subprocess.run(["git", "-C", ROOT, "show", f"{revision}:{path}"], capture_output=True,
                            text=True, check=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    name = os.path.splitext(os.path.basename(path))[0] + "_at_revision"
    spec = importlib.util.spec_from_file_location(name, f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(f.name)
    return module


def worker_averaging(model_name, repeats, threads, revision):
    """An SWA and an EMA update of `model_name` (ms, medians) with the core of `revision`
    ("-": this tree), and the memory floor over as many floats, in this (fresh) process."""
    runtime.tune_cpu(threads, model_name)
    core = load_core(None if revision == "-" else revision)
    a = models.build(model_name)
    swa, ema = core.SWA(a), core.SWA(a, ema_decay=0.999)
    count = sum(int(p.numel()) for p in a.parameters())
    x, y, z = (np.ones(count, np.float32) for _ in range(3))
    result = {"floats": count, "tensors": len(a.parameters())}
    for caches, before in (("warm", None), ("cold", cache_evictor())):
        result[caches] = {key: median_time(fn, repeats, warmup=2, before=before) for key, fn in (
            ("swa", lambda: swa.update(a)), ("ema", lambda: ema.update(a)),
            ("check", lambda: swa.pairs_with(a)), ("floor", lambda: np.add(x, y, out=z)))}
    return result


def worker_step(model_name, batch_size, repeats, threads):
    """One training step of `model_name` in seconds (median), in this (fresh) process."""
    runtime.tune_cpu(threads, model_name)
    model = models.build(model_name)
    optimizer = paddle.optimizer.Momentum(0.01, parameters=model.parameters())
    batches = [synthetic_batch(batch_size)]
    return {"step": median_time(lambda: engine.train_pass(batches, model, optimizer, lambda s: 0.01,
                                                          lambda s: s), repeats)}


def section_averaging(speed, names, batch_size, repeats, rounds, threads, against=None):
    print("\n2. Averaging against the memory floor: the time to read two arrays and write a third\n"
          "   (numpy adding two float32 arrays into a third over the model's float count), for an\n"
          "   SWA update (once per averaging epoch) and an EMA update (after every step; its share of\n"
          f"   a training step of batch {batch_size}); {threads or 'automatic'} CPU thread(s), "
          f"each version in {rounds} fresh\n   processes per model, alternating, medians; caches "
          "warm (the same arrays again) and cold\n   (evicted before each call, as after a "
          "training step); of the SWA update, the check that the pairing still holds; torch's\n"
          "   _foreach_lerp_ where torch is installed")
    versions = ["-"] + ([against] if against else [])
    print(f"{'model':16s} {'floats':>9s} {'tensors':>7s} {'version':>9s} {'caches':>6s} {'floor':>9s} "
          f"{'SWA.update':>11s} {'ratio':>6s} {'check':>8s} {'EMA update':>11s} {'ratio':>6s} "
          f"{'of a step':>9s} {'torch':>9s}")
    for name in names:
        runs = {v: [] for v in versions}
        for _ in range(rounds):
            for version in versions:
                runs[version].append(spawn("averaging", name, repeats, threads, version))
        step = (batch_size / speed[(name, "tuned")]["train"] if speed else
                spawn("step", name, batch_size, 3, threads)["step"])
        model = models.build(name)
        foreach = torch_foreach_ms([list(p.shape) for p in model.parameters()], repeats)
        for version, samples in runs.items():
            for caches in ("warm", "cold"):
                m = {key: statistics.median(s[caches][key] for s in samples)
                     for key in ("floor", "swa", "ema", "check")}
                label = "this tree" if version == "-" else version[:9]
                print(f"{name:16s} {samples[0]['floats']:9d} {samples[0]['tensors']:7d} {label:>9s} "
                      f"{caches:>6s} {m['floor'] * 1e3:6.2f} ms {m['swa'] * 1e3:8.2f} ms "
                      f"{m['swa'] / m['floor']:6.2f} {m['check'] * 1e3:5.2f} ms {m['ema'] * 1e3:8.2f} ms "
                      f"{m['ema'] / m['floor']:6.2f} {100 * m['ema'] / step:8.2f}%"
                      + (f" {foreach:6.2f} ms" if foreach is not None and caches == "warm"
                         else f" {'-':>9s}"))


def section_refresh(speed, names, train_size=50_000, test_size=10_000):
    print(f"\n3. BatchNorm refresh against a forward pass (from 1.), and one intermediate SWA "
          f"evaluation\n   (refresh over {train_size} training images + {test_size} test images) in "
          "epochs of training")
    for name in names:
        r = speed[(name, "tuned")]
        if not r["bn_refresh"]:
            print(f"{name:16s} no BatchNorm: no refresh; one SWA evaluation = "
                  f"{(test_size / r['eval']) / (train_size / r['train']):.3f} epochs")
            continue
        cost = train_size / r["bn_refresh"] + test_size / r["eval"]
        epoch = train_size / r["train"]
        print(f"{name:16s} refresh {r['bn_refresh']:8.1f} img/s vs eval forward {r['eval']:8.1f} img/s "
              f"({r['eval'] / r['bn_refresh']:.2f}x the time); one SWA evaluation = "
              f"{cost / epoch:.3f} epochs")


# --------------------------------------------------------------------------- the data loader

def reference_loader(ds, batch_size, mean, std, pad):
    """A vectorised numpy loader doing Batches' work, the yardstick beside it: the dataset
    padded once (N x (H + 2 pad) x (W + 2 pad) x C more bytes), each crop a slice of it,
    mirrored through a reversed view, normalised per channel through a 256-entry table whose
    entries are Batches' float32 operations on each value (so its batches are the same).
    Returns assemble(plan, step), as Batches.assemble."""
    height, width, channels = ds.images.shape[1:]
    padded = np.pad(ds.images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    std32 = np.asarray(std, np.float32)
    scale = (1.0 / (255.0 * std32)).astype(np.float32)
    shift = (np.asarray(mean, np.float32) / std32).astype(np.float32)
    tables = np.arange(256, dtype=np.float32)[None, :] * scale[:, None] - shift[:, None]

    def assemble(plan, step):
        order, offsets, flips = plan
        idx = order[step * batch_size:(step + 1) * batch_size]
        crops = np.empty((len(idx), height, width, channels), np.uint8)
        for i, n in enumerate(idx):
            top, left = offsets[n]
            crop = padded[n, top:top + height, left:left + width]
            crops[i] = crop[:, ::-1] if flips[n] else crop
        x = np.empty((len(idx), channels, height, width), np.float32)
        for c in range(channels):
            x[:, c] = tables[c][crops[..., c]]
        return x, ds.labels[idx]
    return assemble


def cifar_sized(count=50_000, seed=0):
    rng = np.random.default_rng(seed)
    return data.ArrayDataset(rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
                             rng.integers(0, 10, count))


def loader_versions(ds, batch_size, against):
    """{name: (epoch of numpy arrays, epoch of Paddle tensors)}: functions of the epoch running
    through all its batches, for this tree's Batches (training's draws and the BatchNorm
    refresh's), the reference, and Batches of git revision `against`."""
    mean, std, augment = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616], data.Augment(4, True)
    ours = data.Batches(ds, batch_size, mean, std, shuffle=True, augment=augment)
    reference = reference_loader(ds, batch_size, mean, std, augment.pad)

    def arrays(assemble, stream=0):
        def epoch_of(epoch):
            plan = ours.plan(epoch, stream)
            for s in range(len(ours)):
                assemble(plan, s)
        return epoch_of

    def tensors(assemble):
        def epoch_of(epoch):
            plan = ours.plan(epoch)
            for s in range(len(ours)):
                x, y = assemble(plan, s)
                paddle.to_tensor(x), paddle.to_tensor(y)
        return epoch_of

    def drain(loader, stream=0):
        return lambda epoch: sum(1 for _ in loader(epoch, stream=stream))

    versions = {"this tree": (arrays(ours.assemble), drain(ours)),
                "this tree, refresh": (arrays(ours.assemble, stream=1), drain(ours, stream=1)),
                "reference": (arrays(reference), tensors(reference))}
    if against:
        old = load_at(against, "harness/data.py").Batches(ds, batch_size, mean, std, shuffle=True,
                                                           augment=augment)
        versions[against[:9]] = (arrays(old.assemble), drain(old))
    same = all(np.array_equal(a.view(np.uint32), b.view(np.uint32))
               for a, b in zip(ours.assemble(ours.plan(0), 0), reference(ours.plan(0), 0)))
    return versions, same


def section_loader(batch_size, rounds, against=None, fastest=None):
    settings = runtime.tune_cpu(1)  # Paddle's threads, and freed memory kept, as train.py's
    print(f"\n4. Data loader: 50,000 CIFAR-sized uint8 images in memory (random), batch {batch_size}, "
          f"crop with padding 4 + flip,\n   normalisation; {settings}; each version over a whole "
          f"epoch in turn, {rounds} rounds, median images/s")
    ds = cifar_sized()
    versions, same = loader_versions(ds, batch_size, against)
    times = {name: ([], []) for name in versions}
    for epoch in range(rounds + 1):  # the first round warms up and is not counted
        for name, functions in versions.items():
            for kind, fn in enumerate(functions):
                start = time.perf_counter()
                fn(epoch)
                if epoch:
                    times[name][kind].append(time.perf_counter() - start)
    rate = {name: [len(ds) / statistics.median(t) for t in pair] for name, pair in times.items()}
    print(f"{'version':20s} {'numpy arrays':>12s} {'of reference':>12s} {'with to_tensor':>14s} "
          f"{'of reference':>12s}")
    for name, (arrays, tensors) in rate.items():
        ref = rate["reference"]
        print(f"{name:20s} {arrays:12,.0f} {arrays / ref[0]:11.2f}x {tensors:14,.0f} "
              f"{tensors / ref[1]:11.2f}x")
    print(f"the reference's batches are this tree's, bit for bit: {'yes' if same else 'NO'}")
    if fastest:
        ours = rate["this tree"][1]
        print(f"loader {ours:,.0f} img/s (with conversion to Paddle tensors) vs fastest training "
              f"above {fastest:,.0f} img/s: {ours / fastest:.1f}x")


class StandInStep(paddle.nn.Layer):
    """A training step of `seconds` that leaves the host's core free, as a step queued on a
    GPU does (a sleep), with a small layer to give it gradients."""

    def __init__(self, seconds, channels=3):
        super().__init__()
        self.seconds, self.linear = seconds, paddle.nn.Linear(channels, 10)

    def forward(self, x):
        time.sleep(self.seconds)
        return self.linear(x.mean(axis=[2, 3]))


def timed_passes(ds, batch_size, model, rounds, augment, steps=None):
    """Medians over `rounds` (alternating) of train_pass over the first `steps` batches of an
    epoch of `ds` (a Data): with batches assembled in the loop, one thread ahead, from arrays
    assembled beforehand (only the conversion to tensors, which stays in the loop) and from
    tensors made beforehand (the steps alone); {mode: (seconds, seconds waiting for batches)}."""
    make = {mode: data.Batches(ds.train, batch_size, ds.mean, ds.std, shuffle=True,
                               augment=augment, num_workers=workers)
            for mode, workers in (("in the loop", 0), ("one thread ahead", 1))}
    loader = make["in the loop"]
    steps = steps or len(loader)
    arrays = [loader.assemble(loader.plan(0), s) for s in range(steps)]
    ready = [(paddle.to_tensor(x), paddle.to_tensor(y)) for x, y in arrays]
    make["to_tensor only"] = lambda epoch: ((paddle.to_tensor(x), paddle.to_tensor(y)) for x, y in arrays)
    make["steps alone"] = lambda epoch: ready
    optimizer = paddle.optimizer.SGD(0.01, parameters=model.parameters())
    results = {mode: [] for mode in make}
    for epoch in range(rounds + 1):  # the first round warms up and is not counted
        for mode in results:
            batches = itertools.islice(make[mode](epoch), steps)
            start = time.perf_counter()
            r = engine.train_pass(batches, model, optimizer, lambda s: 0.01, lambda s: s)
            if epoch:
                results[mode].append((time.perf_counter() - start, r["data_wait"]))
    return {mode: tuple(statistics.median(v[i] for v in values) for i in (0, 1))
            for mode, values in results.items()}


def print_passes(results, steps):
    """The table of `timed_passes`' results, over `steps` steps."""
    alone = results["steps alone"][0]
    print(f"{'batches':18s} {'pass':>9s} {'per step':>9s} {'over the steps alone':>21s} "
          f"{'waiting for data':>17s}")
    for mode, (seconds, waited) in results.items():
        print(f"{mode:18s} {seconds:8.3f}s {1e3 * seconds / steps:7.2f}ms {seconds - alone:+20.3f}s "
              f"{100 * waited / seconds:16.1f}%")


def section_overlap(batch_size, rounds, step_ms, steps=40):
    print(f"\n4b. Overlap: a training pass (engine.train_pass, as train.py's) over {steps} CIFAR-sized "
          f"batches of {batch_size}\n    with a stand-in step of {step_ms} ms that leaves the core "
          f"free, as a GPU's does; {rounds} rounds, alternating, medians")
    train = cifar_sized(steps * batch_size)
    ds = data.Data("CIFAR-sized", train, train, 10, *data.channel_statistics(train.images),
                   data.Augment(4, True))
    results = timed_passes(ds, batch_size, StandInStep(step_ms / 1e3), rounds, ds.augment, steps)
    print_passes(results, steps)


def section_quick_start_model(rounds):
    ds = data.load_dataset("digits")
    steps = -(-len(ds.train) // 128)
    print("\n4c. On this CPU: the quick start's training pass (SimpleCNN on digits, batch 128, "
          f"{steps} steps,\n    {runtime.tune_cpu(0, 'SimpleCNN')}, as train.py's), {rounds} rounds, "
          "alternating, medians")
    paddle.seed(0)
    model = models.build("SimpleCNN", ds.num_classes, ds.image_shape[0])
    print_passes(timed_passes(ds, 128, model, rounds, ds.augment), steps)




def section_run(repeats, epochs=60, swa_start=40):
    print(f"\n5. SWA's share of a whole run: the quick start (train.py --dataset digits --model "
          f"SimpleCNN --epochs {epochs} --swa --swa_start {swa_start} --swa_lr 0.05), the average "
          "evaluated only at the end")
    base = ["--dataset", "digits", "--model", "SimpleCNN", "--epochs", epochs, "--eval_freq", 1000,
            "--save_freq", 1000]
    swa_flags = ["--swa", "--swa_start", swa_start, "--swa_lr", 0.05]
    runs = {"sgd": [], "swa": []}
    for _ in range(repeats):
        for kind in ("sgd", "swa"):
            with tempfile.TemporaryDirectory() as tmp:
                flags = base + (swa_flags if kind == "swa" else []) + ["--dir", os.path.join(tmp, "r")]
                runs[kind].append(spawn("run", json.dumps([str(f) for f in flags])))
    swa = runs["swa"]
    own = statistics.median(r["update"] + r["bn_update"] for r in swa)
    total = statistics.median(r["total"] for r in swa)
    sgd_total = statistics.median(r["total"] for r in runs["sgd"])
    print(f"averaging {statistics.median(r['update'] for r in swa) * 1e3:.1f} ms "
          f"({epochs - swa_start + 1} updates) + final BatchNorm refresh "
          f"{statistics.median(r['bn_update'] for r in swa) * 1e3:.1f} ms = {own * 1e3:.1f} ms of a "
          f"{total:.2f} s run: {100 * own / total:.2f}%")
    print(f"wall clock: --swa {total:.2f} s vs without {sgd_total:.2f} s "
          f"({100 * (total - sgd_total) / sgd_total:+.1f}%, including the final SWA test pass "
          "and run-to-run noise)")


def main(argv=None):
    p = cli.ArgumentParser(prog="bench.py", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="VGG16,PreResNet110,PreResNet164,SimpleCNN",
                   help="comma-separated zoo models (default: VGG16,PreResNet110,PreResNet164,SimpleCNN)")
    p.add_argument("--batch_size", type=int, default=64, help="batch size (default: 64)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per median (default: 3)")
    p.add_argument("--rounds", type=int, default=2,
                   help="fresh processes per model and setting in 1. (default: 2)")
    p.add_argument("--averaging_only", action="store_true",
                   help="run only section 2, the averaging against the memory floor (default: off)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads in section 2 (0: train.py's automatic count) (default: 1)")
    p.add_argument("--against", metavar="REV",
                   help="in section 2, also time utils.py of git revision REV, alternating with this "
                        "tree's; with --loader, its harness/data.py (default: this tree only)")
    p.add_argument("--loader", action="store_true",
                   help="run only section 4, the data loader against a vectorised numpy reference, "
                        "and the overlap of loading with the steps (default: off)")
    p.add_argument("--step_ms", type=float, default=12.8,
                   help="the stand-in step of 4b., in ms (default: 12.8, a batch of 128 at 10,000 "
                        "images/s, a V100's speed on the zoo's fastest models)")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        kind, *rest = args.worker
        if kind == "speed":
            result = worker_speed(rest[0], int(rest[1]), int(rest[2]), rest[3])
        elif kind == "averaging":
            result = worker_averaging(rest[0], int(rest[1]), int(rest[2]), rest[3])
        elif kind == "step":
            result = worker_step(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
        else:
            result = worker_run(json.loads(rest[0]))
        print(json.dumps(result))
        return 0
    names = [models.canonical_name(n) for n in args.models.split(",")]
    started = time.time()
    print(f"swa-paddle benchmark: {machine()}")
    print(f"repeats {args.repeats} (medians); train.py's CPU settings: automatic threads per model, "
          "MKL_DEBUG_CPU_TYPE=5 on AMD, freed memory kept for reuse")
    if args.loader:
        section_loader(args.batch_size, args.repeats, args.against)
        section_overlap(args.batch_size, args.repeats, args.step_ms)
        section_quick_start_model(args.repeats)
        print(f"\n(benchmark took {time.time() - started:.0f} s)")
        return 0
    if args.averaging_only:
        section_averaging(None, names, args.batch_size, max(20, args.repeats), args.rounds,
                          args.threads, args.against)
        return 0
    speed = section_speed(names, args.batch_size, args.repeats, args.rounds)
    section_averaging(speed, names, args.batch_size, max(20, args.repeats), args.rounds,  # ms each:
                      args.threads, args.against)                                         # cheap to repeat
    section_refresh(speed, names)
    section_loader(args.batch_size, args.repeats,
                   fastest=max(speed[(n, "tuned")]["train"] for n in names))
    section_run(args.repeats + 2)
    print(f"\n(benchmark took {time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
