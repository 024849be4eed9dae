"""Benchmark swa-paddle on this machine (a benchmark, not a test).

    python scripts/bench.py                       # a few minutes on 2 cores
    python scripts/bench.py --models VGG16 --batch_size 128 --repeats 5

Prints, with the machine and settings:
  1. train and eval images/s per model: Paddle's defaults against train.py's automatic CPU
     settings (each measured in a fresh process, since MKL reads its settings once);
  2. one SWA averaging step against the numpy memory floor (numpy adding two float32 arrays
     into a third over as many values), and an EMA update (done after every training step)
     as a fraction of a training step; --against REV times utils.py of a git revision beside
     this tree's (each in fresh processes, alternating);
  3. the BatchNorm refresh against one forward pass over the same images, and what an
     intermediate SWA evaluation costs in epochs;
  4. the data loader's images/s against training's;
  5. SWA's own share of a whole run (averaging + final BatchNorm refresh), evaluated only
     at the end, and the wall-clock difference of the same run with and without --swa.
All times are medians of --repeats measurements.
"""
import argparse
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


def median_time(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
    """utils.py of this tree (revision None), or of a git revision of it (read with git show,
    imported under another name): the averaging updates of two versions, timed alike."""
    if revision is None:
        return utils
    import importlib.util

    source = subprocess.run(["git", "-C", ROOT, "show", f"{revision}:utils.py"], capture_output=True,
                            text=True, check=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("utils_at_revision", f.name)
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
    result = {"floats": count, "tensors": len(a.parameters()),
              "swa": median_time(lambda: swa.update(a), repeats, warmup=2),
              "ema": median_time(lambda: ema.update(a), repeats, warmup=2)}
    x, y, z = (np.ones(count, np.float32) for _ in range(3))
    result["floor"] = median_time(lambda: np.add(x, y, out=z), repeats, warmup=2)
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
          f"each version in {rounds} fresh\n   processes per model, alternating, medians; torch's "
          "_foreach_lerp_ where torch is installed")
    versions = ["-"] + ([against] if against else [])
    print(f"{'model':16s} {'floats':>9s} {'tensors':>7s} {'version':>9s} {'floor':>9s} "
          f"{'SWA.update':>11s} {'ratio':>6s} {'EMA update':>11s} {'ratio':>6s} {'of a step':>9s} "
          f"{'torch':>9s}")
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
            m = {key: statistics.median(s[key] for s in samples) for key in ("floor", "swa", "ema")}
            label = "this tree" if version == "-" else version[:9]
            print(f"{name:16s} {samples[0]['floats']:9d} {samples[0]['tensors']:7d} {label:>9s} "
                  f"{m['floor'] * 1e3:6.2f} ms {m['swa'] * 1e3:8.2f} ms {m['swa'] / m['floor']:6.2f} "
                  f"{m['ema'] * 1e3:8.2f} ms {m['ema'] / m['floor']:6.2f} {100 * m['ema'] / step:8.2f}%"
                  + (f" {foreach:6.2f} ms" if foreach is not None else f" {'-':>9s}"))


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


def section_loader(speed, names, batch_size, repeats):
    print("\n4. Data loader (50,000 CIFAR-sized uint8 images in memory, crop + flip, one thread)")
    rng = np.random.default_rng(0)
    ds = data.ArrayDataset(rng.integers(0, 256, (50_000, 32, 32, 3), dtype=np.uint8),
                           rng.integers(0, 10, 50_000))
    loader = data.Batches(ds, batch_size, [0.5] * 3, [0.25] * 3, shuffle=True,
                          augment=data.Augment(pad=4, flip=True))
    seconds = median_time(lambda: sum(1 for _ in loader(epoch=0)), repeats)
    rate = len(ds) / seconds
    fastest = max(speed[(n, "tuned")]["train"] for n in names)
    print(f"loader {rate:,.0f} img/s (with conversion to Paddle tensors) vs fastest training "
          f"above {fastest:,.0f} img/s: {rate / fastest:.1f}x")


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
                        "tree's (default: this tree only)")
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
    if args.averaging_only:
        section_averaging(None, names, args.batch_size, max(20, args.repeats), args.rounds,
                          args.threads, args.against)
        return 0
    speed = section_speed(names, args.batch_size, args.repeats, args.rounds)
    section_averaging(speed, names, args.batch_size, max(20, args.repeats), args.rounds,  # ms each:
                      args.threads, args.against)                                         # cheap to repeat
    section_refresh(speed, names)
    section_loader(speed, names, args.batch_size, args.repeats)
    section_run(args.repeats + 2)
    print(f"\n(benchmark took {time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
