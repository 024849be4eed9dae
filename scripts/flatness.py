"""Train loss and test error around the SWA and SGD weights of a checkpoint (the paper's Fig. 5
and 6): along random directions from each, and along the line from SGD through SWA.

    python scripts/flatness.py --model_path runs/digits/checkpoint-60.pdparams --out runs/digits/flatness

(a) Rays: for each of --directions random directions d, the weights w + t d for t from 0 to
--max_distance (half the norm of the SWA weights unless given), from w = SWA and from
w = SGD, the same d for both. A direction is drawn
normal, filter-normalised against the SWA weights (each filter of a convolution or row of a
linear layer scaled to that filter's norm; biases and BatchNorm scales left at 0, as Li et
al. 2018) and scaled to unit length, so t is the Euclidean distance in weight space.
(b) Line: w_SGD + t (w_SWA - w_SGD) for t from -1 to 2 (0 is SGD, 1 is SWA), plotted
against t * |w_SWA - w_SGD|. A model with BatchNorm gets its statistics recomputed at every
point, on the training set as eval.py does. Writes DIR/flatness.csv (every point) and
DIR/flatness.png.
"""
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness  # noqa: E402

harness.prepare()  # before Paddle loads: the math library's path, Paddle's import-time warnings
import numpy as np  # noqa: E402
import paddle  # noqa: E402

import utils  # noqa: E402
from harness import checkpoints, cli, engine, errors, report  # noqa: E402
from harness import data as datasets  # noqa: E402

COLUMNS = ["kind", "start", "direction", "t", "distance", "train_loss", "train_error",
           "test_loss", "test_error"]


def build_parser():
    p = cli.ArgumentParser(prog="flatness.py", description=__doc__.split("\n")[0])
    p.add_argument("--model_path", required=True, metavar="CKPT", type=cli.path_argument,
                   help="checkpoint of a run with SWA (required)")
    p.add_argument("--out", required=True, metavar="DIR", type=cli.path_argument,
                   help="folder for flatness.csv and flatness.png (required)")
    p.add_argument("--directions", type=cli.number(int, 1, 100), default=5,
                   help="random directions from each of SWA and SGD (default: 5)")
    p.add_argument("--max_distance", type=cli.number(float, 0, 1e6, low_open=True),
                   help="how far along each direction (default: half the norm |w_SWA|)")
    p.add_argument("--points", type=cli.number(int, 2, 1001), default=11,
                   help="points along each direction and along the line (default: 11)")
    p.add_argument("--bn_batches", type=cli.POSITIVE_INT,
                   help="training batches for each BatchNorm refresh (default: all)")
    p.add_argument("--seed", type=cli.SEED, default=0, help="seed of the directions (default: 0)")
    cli.add_checkpoint_overrides(p, "the checkpoint's")
    return p


# --------------------------------------------------------------------------- weights

def trainable(model):
    """(name, parameter) of the weights moved (trainable ones; BatchNorm statistics are
    recomputed instead)."""
    return [(n, p) for n, p in model.named_parameters() if not p.stop_gradient]


def vectors(model):
    return {n: p.numpy().astype(np.float64) for n, p in trainable(model)}


def direction(weights, rng):
    """A random direction, filter-normalised against `weights`, of unit Euclidean length."""
    d = {}
    for name, w in weights.items():
        if w.ndim <= 1:
            d[name] = np.zeros_like(w)
            continue
        z = rng.standard_normal(w.shape)
        axes = tuple(range(1, w.ndim))
        norms = np.sqrt((w ** 2).sum(axis=axes, keepdims=True))
        d[name] = z / (np.sqrt((z ** 2).sum(axis=axes, keepdims=True)) + 1e-12) * norms
    length = np.sqrt(sum((v ** 2).sum() for v in d.values()))
    return {name: v / length for name, v in d.items()}


def distance(a, b):
    return float(np.sqrt(sum(((a[n] - b[n]) ** 2).sum() for n in a)))


# --------------------------------------------------------------------------- measuring

class Probe:
    """Loss and error of the model at given weights, BatchNorm refreshed at each point."""

    def __init__(self, trained, bn_batches):
        self.trained, self.bn_batches = trained, bn_batches
        self.model, self.ds, self.batch_size = trained.model, trained.ds, trained.batch_size
        self.params = dict(trainable(self.model))
        self.has_bn = bool(utils.batch_norm_layers(self.model))

    def refresh(self):
        plan = self.trained.refresh_batches()
        if self.bn_batches:
            plan = (b for b, _ in zip(plan, range(self.bn_batches)))
        return utils.bn_update(plan, self.model)

    def measure(self, weights):
        with paddle.no_grad():
            for name, value in weights.items():
                self.params[name].set_value(value.astype(np.float32))
        if self.has_bn:
            self.refresh()
        result = {}
        for split, data in (("train", self.ds.train), ("test", self.ds.test)):
            r = engine.evaluate_pass(datasets.Batches(data, self.batch_size, self.ds.mean,
                                                      self.ds.std)(), self.model)
            result.update({f"{split}_loss": r["loss"], f"{split}_error": 100.0 - r["accuracy"]})
        return result


def points(args, swa, sgd, probe):
    """Every point of (a) and (b), as CSV rows."""
    gap = distance(swa, sgd)
    reach = args.max_distance or 0.5 * distance(swa, {n: np.zeros_like(v) for n, v in swa.items()})
    rng = np.random.default_rng(args.seed)
    directions = [direction(swa, rng) for _ in range(args.directions)]
    plan = [("ray", start, i, t, t) for i in range(args.directions) for start in ("SWA", "SGD")
            for t in np.linspace(0.0, reach, args.points)]
    plan += [("line", "SGD", "", t, t * gap) for t in np.linspace(-1.0, 2.0, 3 * args.points - 2)]
    progress = report.Progress(sys.stderr)
    progress.start("flatness points", len(plan))
    rows = []
    for k, (kind, start, i, t, dist) in enumerate(plan):
        if kind == "ray":
            base = swa if start == "SWA" else sgd
            weights = {n: base[n] + t * directions[i][n] for n in base}
        else:
            weights = {n: sgd[n] + t * (swa[n] - sgd[n]) for n in sgd}
        rows.append(dict(kind=kind, start=start, direction=i, t=float(t), distance=float(dist),
                         **probe.measure(weights)))
        progress.update(k + 1)
    progress.clear()
    return rows, gap


# --------------------------------------------------------------------------- the figure

def plot(rows, gap, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    colours = {"SWA": "tab:red", "SGD": "tab:blue"}
    for column, (key, label) in enumerate((("train_loss", "train loss"), ("test_error", "test error (%)"))):
        axis = axes[0][column]
        for start in ("SWA", "SGD"):
            rays = {}
            for r in rows:
                if r["kind"] == "ray" and r["start"] == start:
                    rays.setdefault(r["direction"], []).append((r["distance"], r[key]))
            for i, ray in enumerate(rays.values()):
                axis.plot(*zip(*ray), color=colours[start], alpha=0.6, linewidth=1,
                          label=f"from {start}" if i == 0 else None)
        axis.set_xlabel("distance along a random direction")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
        axis = axes[1][column]
        line = [(r["distance"], r[key]) for r in rows if r["kind"] == "line"]
        axis.plot(*zip(*line), color="black", linewidth=1.5, marker="o", markersize=3)
        for x, name in ((0.0, "SGD"), (gap, "SWA")):
            axis.axvline(x, color=colours[name], linestyle=":", linewidth=1.5)
            axis.annotate(name, (x, 1.0), xycoords=("data", "axes fraction"), ha="center",
                          va="bottom", color=colours[name])
        axis.set_xlabel("distance from SGD along the line through SWA")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def flatness(args):
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise errors.UsageError(f"--out {args.out} is a file; give a folder")
    ckpt = checkpoints.load_checkpoint(args.model_path)  # a bad checkpoint creates nothing
    for name in ("flatness.csv", "flatness.png"):  # checked (and the folder made) before work
        cli.check_output(os.path.join(args.out, name), "--out", overwrite=True)
    if not ckpt.has_average:
        raise errors.UsageError(f"{args.model_path} holds no SWA average; give a checkpoint of a run "
                                "with --swa, from an averaged epoch")
    trained = checkpoints.rebuild(ckpt, args.model_path, args.model, args.dataset,
                                  args.data_path, args.batch_size, args.device, args.threads)
    model, ds, name, batch_size = trained.model, trained.ds, trained.model_name, trained.batch_size
    vectors_of = {}
    for weights, state in (("SWA", ckpt.swa_state_dict), ("SGD", ckpt.state_dict)):
        checkpoints.load_weights(model, state, source=args.model_path)
        vectors_of[weights] = vectors(model)
    probe = Probe(trained, args.bn_batches)
    rows, gap = points(args, vectors_of["SWA"], vectors_of["SGD"], probe)
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "flatness.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    png = plot(rows, gap, os.path.join(args.out, "flatness.png"))
    refresh = "no BatchNorm" if not probe.has_bn else (
        f"BatchNorm recomputed at each point on {args.bn_batches or 'all'} training batches of {batch_size}")
    return name, ds, gap, refresh, csv_path, png, len(rows)


def run(argv):
    args = build_parser().parse_args(argv)
    name, ds, gap, refresh, csv_path, png, count = flatness(args)
    print(f"{name} on {ds.name}: |w_SWA - w_SGD| = {gap:.4g}; {count} points; {refresh}")
    print(f"wrote {csv_path} and {png}")
    return 0


def main(argv=None):
    return cli.main("flatness.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
