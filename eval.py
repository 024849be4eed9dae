"""Evaluate a checkpoint on its test set: accuracy, NLL and expected calibration error.

    python eval.py --model_path runs/digits/checkpoint-30.pdparams
    python eval.py --model_path runs/digits/checkpoint-30.pdparams --swag_samples 30

Uses the SWA weights when the checkpoint has them (--sgd for the SGD weights); the model,
dataset and data path come from the checkpoint unless given. With --swag_samples (a run
trained with --swag), SGD, SWA and SWAG's Bayesian model average are compared.
"""
import argparse
import dataclasses
import sys

import runtime  # first: sets the math library's path and quiets Paddle's import-time warnings
import numpy as np

import checkpoints
import cli
import data as datasets
import engine
import models
import report
import utils

EXAMPLES = """examples:
  python eval.py --model_path runs/digits/checkpoint-60.pdparams
  python eval.py --model_path runs/digits/checkpoint-60.pdparams --sgd
  python eval.py --model_path runs/swag/checkpoint-60.pdparams --swag_samples 30 --reliability calibration.png
"""


def build_parser():
    p = cli.ArgumentParser(prog="eval.py", description="Evaluate an SGD/SWA checkpoint on the test set.",
                           epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, metavar="CKPT",
                   help="checkpoint written by train.py (required)")
    p.add_argument("--sgd", action="store_true",
                   help="evaluate the SGD weights even if the checkpoint has SWA weights (default: off)")
    p.add_argument("--bn_update", action="store_true",
                   help="recompute the BatchNorm statistics of the weights evaluated, SGD's too "
                        "(default: only the average's, and only when they are stale)")
    swag = p.add_argument_group("SWAG (checkpoints of train.py --swag)")
    swag.add_argument("--swag_samples", type=cli.NON_NEGATIVE_INT, default=0, metavar="S",
                      help="average the predictions of S models sampled from SWAG (30 in the "
                           "paper), each after a BatchNorm refresh, and compare SGD, SWA and SWAG "
                           "(default: 0, off)")
    swag.add_argument("--swag_scale", type=cli.NON_NEGATIVE_FLOAT, default=0.5, metavar="SCALE",
                      help="covariance scale of the samples (default: 0.5)")
    swag.add_argument("--swag_diag", action="store_true",
                      help="sample from the diagonal covariance only, SWAG-diagonal (default: off)")
    swag.add_argument("--seed", type=cli.SEED, default=0,
                      help="seed of the samples; sample i uses seed + i (default: 0)")
    p.add_argument("--reliability", metavar="PNG",
                   help="draw reliability diagrams (SGD, SWA and, with --swag_samples, SWAG side "
                        "by side) into this PNG (default: none)")
    cli.add_checkpoint_overrides(p, "the checkpoint's")
    return p


# --------------------------------------------------------------------------- scores

def calibration_error(probs, labels, bins=15):
    """Expected calibration error: sum over equal-width confidence bins of
    (fraction of samples in the bin) * |accuracy - mean confidence|, as a fraction."""
    return float(sum(weight * abs(acc - conf) for weight, acc, conf, _ in
                     reliability_bins(probs, labels, bins) if weight))


def reliability_bins(probs, labels, bins=15):
    """Per equal-width confidence bin: (fraction of samples, accuracy, mean confidence, upper edge)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        members = which == b
        if members.any():
            rows.append((members.mean(), correct[members].mean(), confidence[members].mean(), edges[b + 1]))
        else:
            rows.append((0.0, 0.0, 0.0, edges[b + 1]))
    return rows


def softmax(logits):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def scores(probs, labels, bins=15):
    """Accuracy (%), NLL (mean per example) and ECE (%) of predicted probabilities."""
    picked = np.clip(probs[np.arange(len(labels)), labels], np.finfo(np.float64).tiny, None)
    return {"accuracy": 100.0 * float((probs.argmax(axis=1) == labels).mean()),
            "nll": float(-np.log(picked).mean()),
            "ece": 100.0 * calibration_error(probs, labels, bins)}


def format_scores(r):
    return f"accuracy {r['accuracy']:.4f}%  NLL {r['nll']:.4f}  ECE {r['ece']:.4f}% (15 bins)"


# --------------------------------------------------------------------------- models and data

def _setting(given, ckpt_args, key, default=None):
    return given if given is not None else (ckpt_args or {}).get(key, default)


def model_for(ckpt, path, model_name=None, dataset=None, data_path=None, device="auto", threads=0):
    """Load the dataset and build the (empty) model a checkpoint was trained with.

    Flags given override what the checkpoint says; the inputs are normalised as in training.
    Returns (model, data, model name).
    """
    saved = ckpt.get("args") or {}
    model_name = model_name or ckpt.get("model_name") or saved.get("model")
    dataset = dataset or ckpt.get("dataset") or saved.get("dataset")
    if model_name is None or dataset is None:
        raise cli.UsageError(f"{path} does not say which model and dataset it holds; "
                             "pass --model and --dataset")
    try:
        model_name = models.canonical_name(model_name)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    if runtime.select_device(device) == "cpu":
        runtime.tune_cpu(threads, model_name)
    ds = datasets.load_dataset(dataset, _setting(data_path, saved, "data_path", "data"),
                               download=not saved.get("no_download", False))
    norm = ckpt.get("normalization")
    if norm and len(norm["mean"]) == ds.image_shape[0]:
        ds = dataclasses.replace(ds, mean=np.array(norm["mean"], np.float32),
                                 std=np.array(norm["std"], np.float32))
    return models.build(model_name, ds.num_classes, ds.image_shape[0]), ds, model_name


def refresh_epoch(ckpt):
    """The 0-based epoch whose refresh batches train.py drew for the checkpoint's average."""
    return max(int(ckpt["epoch"]) - 1, 0)


def refresh_batch_norm(model, ds, batch_size, seed=1, epoch=0):
    """Recompute `model`'s BatchNorm statistics on the training set, as train.py does.
    Returns the number of images seen (0 for a model without BatchNorm)."""
    batches = datasets.Batches(ds.train, batch_size, ds.mean, ds.std, shuffle=True,
                               augment=ds.augment, seed=seed)
    return utils.bn_update(batches(epoch, stream=1), model)


def predict(model, ds, batch_size):
    """Probabilities of `model` on the test set, and the labels."""
    result = engine.run_epoch(datasets.Batches(ds.test, batch_size, ds.mean, ds.std)(), model,
                              keep_logits=True)
    return softmax(result["logits"]), result["labels"]


def test_scores(model, ds, batch_size):
    """Accuracy (%), NLL, ECE (%) and count of `model` on the test set."""
    probs, labels = predict(model, ds, batch_size)
    return dict(scores(probs, labels), count=len(labels), probs=probs, labels=labels)


def swag_average(ckpt, model, ds, batch_size, samples, scale, diagonal, seed, seed_bn, epoch):
    """Bayesian model average of `samples` SWAG samples: mean probabilities on the test set.
    Each sample's BatchNorm statistics are recomputed on the training data first."""
    if ckpt.get("swag_var_sum") is None:
        raise cli.UsageError("--swag_samples: the checkpoint holds no SWAG statistics; train "
                             "with --swa --swag")
    swag = utils.SWAG(model, max_rank=int(ckpt["swag_max_rank"]))
    try:
        swag.set_state_dict(ckpt)
    except ValueError as e:
        raise checkpoints.CheckpointError(f"cannot read SWAG from the checkpoint: {e}") from None
    if not diagonal and len(swag.deviations) < 2:
        raise cli.UsageError(f"the checkpoint's SWAG holds {len(swag.deviations)} deviation(s): "
                             "the low-rank term needs 2; pass --swag_diag")
    total, labels, sample = None, None, None
    progress = report.Progress(sys.stderr)
    progress.start("SWAG samples", samples)
    for i in range(samples):
        sample = swag.sample(scale=scale, cov=not diagonal, seed=seed + i, out=sample)
        refresh_batch_norm(sample, ds, batch_size, seed_bn, epoch)
        probs, labels = predict(sample, ds, batch_size)
        total = probs if total is None else total + probs
        progress.update(i + 1)
    progress.clear()
    return total / samples, labels, swag


# --------------------------------------------------------------------------- the script

def evaluate(args):
    ckpt = checkpoints.load_checkpoint(args.model_path)
    saved = ckpt.get("args") or {}
    model, ds, model_name = model_for(ckpt, args.model_path, args.model, args.dataset,
                                      args.data_path, args.device, args.threads)
    batch_size = _setting(args.batch_size, saved, "batch_size", 128)
    has_swa = bool(ckpt.get("swa_n")) and ckpt.get("swa_state_dict") is not None
    results = {}
    wanted = ["SGD", "SWA"] if args.swag_samples or args.reliability else \
        ["SWA" if has_swa and not args.sgd else "SGD"]
    for weights in wanted:
        if weights == "SWA" and not has_swa:
            continue
        results[weights] = evaluate_weights(ckpt, args, model, ds, weights, batch_size)
    if args.swag_samples:
        probs, labels, swag = swag_average(ckpt, model, ds, batch_size, args.swag_samples,
                                           args.swag_scale, args.swag_diag, args.seed,
                                           saved.get("seed", 1), refresh_epoch(ckpt))
        results["SWAG"] = dict(scores(probs, labels), count=len(labels), probs=probs,
                               labels=labels, swag_n=swag.n, rank=len(swag.deviations))
    info = dict(model=model_name, dataset=ds.name, swa_n=ckpt.get("swa_n"),
                position=checkpoints.describe_position(int(ckpt["epoch"]), int(ckpt.get("step") or 0)))
    return results, info


def evaluate_weights(ckpt, args, model, ds, weights, batch_size):
    key = "swa_state_dict" if weights == "SWA" else "state_dict"
    try:
        checkpoints.load_weights(model, ckpt[key], source=args.model_path)
    except ValueError as e:
        raise checkpoints.CheckpointError(str(e)) from None
    refreshed = False
    stale = weights == "SWA" and not ckpt.get("swa_bn_updated", False)
    if stale or getattr(args, "bn_update", False):
        # Recompute the statistics as train.py does for the average.
        saved = ckpt.get("args") or {}
        refreshed = refresh_batch_norm(model, ds, batch_size, saved.get("seed", 1),
                                       refresh_epoch(ckpt)) > 0
    return dict(test_scores(model, ds, batch_size), refreshed=refreshed)


def describe(weights, result, info, args):
    if weights == "SGD":
        return "SGD weights" + (" (BatchNorm statistics recomputed)" if result["refreshed"] else "")
    if weights == "SWA":
        return f"SWA weights (average of {info['swa_n']} models" + (
            ", BatchNorm statistics recomputed)" if result["refreshed"] else ")")
    kind = "diagonal" if args.swag_diag else f"diagonal + rank {result['rank']}"
    return (f"SWAG ({args.swag_samples} samples, scale {args.swag_scale:g}, {kind} covariance, "
            f"from {result['swag_n']} models)")


def plot_reliability(results, out):
    """Reliability diagrams of each result, side by side: accuracy per confidence bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.6 * len(results), 3.6), squeeze=False,
                             sharey=True)
    for axis, (weights, r) in zip(axes[0], results.items()):
        rows = [row for row in reliability_bins(r["probs"], r["labels"]) if row[0]]
        width = 1.0 / 15
        axis.bar([row[3] - width for row in rows], [row[1] for row in rows], width=width,
                 align="edge", edgecolor="black", color="tab:blue", label="accuracy")
        axis.plot([row[3] - width / 2 for row in rows], [row[2] for row in rows], "o",
                  color="tab:red", markersize=4, label="mean confidence")
        axis.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
        axis.set_title(f"{weights}: ECE {r['ece']:.2f}%")
        axis.set_xlabel("confidence (15 bins)")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def run(argv):
    args = build_parser().parse_args(argv)
    if (args.swag_diag or args.swag_scale != 0.5) and not args.swag_samples:
        raise cli.UsageError("--swag_diag and --swag_scale shape the SWAG samples: add --swag_samples S")
    results, info = evaluate(args)
    print(f"{info['model']} at {info['position']}, {info['dataset']} test set "
          f"({next(iter(results.values()))['count']} images)")
    for weights, r in results.items():
        print(f"{describe(weights, r, info, args)}: {format_scores(r)}")
    if args.reliability:
        print(f"reliability diagrams: {plot_reliability(results, args.reliability)}")
    return 0


def main(argv=None):
    return cli.main("eval.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
