"""Scoring predictions: accuracy, NLL and calibration, the test-set predictions of a model, the
weights of a checkpoint evaluated as train.py evaluated them, SWAG's Bayesian model average,
and reliability diagrams. Used by eval.py and scripts/.
"""
import sys

import numpy as np

import utils
from harness import checkpoints, engine, errors, report
from harness import data as datasets


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


# --------------------------------------------------------------------------- models

def predict(model, ds, batch_size):
    """Probabilities of `model` on the test set, and the labels."""
    result = engine.evaluate_pass(datasets.Batches(ds.test, batch_size, ds.mean, ds.std)(), model,
                                  keep_logits=True)
    return softmax(result["logits"]), result["labels"]


def test_scores(model, ds, batch_size):
    """Accuracy (%), NLL, ECE (%) and count of `model` on the test set, with the probabilities."""
    probs, labels = predict(model, ds, batch_size)
    return dict(scores(probs, labels), count=len(labels), probs=probs, labels=labels)


def evaluate_weights(trained, ckpt, weights, source, bn_update=False):
    """Load the checkpoint's "SGD" or "SWA" weights into `trained.model` and score them on the
    test set. The BatchNorm statistics are recomputed on train.py's refresh batches when the
    average's are stale, or for any weights with `bn_update`; `refreshed` says whether."""
    state = ckpt.swa_state_dict if weights == "SWA" else ckpt.state_dict
    checkpoints.load_weights(trained.model, state, source=source)
    stale = weights == "SWA" and not ckpt.swa_bn_updated
    refreshed = (stale or bn_update) and utils.bn_update(trained.refresh_batches(), trained.model) > 0
    return dict(test_scores(trained.model, trained.ds, trained.batch_size), refreshed=refreshed)


def swag_average(ckpt, trained, samples, scale, diagonal, seed, rank_divisor="held"):
    """Bayesian model average of `samples` SWAG samples (`utils.SWAG.sample`'s `scale`,
    `rank_divisor`; `diagonal`: SWAG-diagonal): mean probabilities on the test set, the labels
    and the SWAG. Each sample's BatchNorm statistics are recomputed first."""
    if ckpt.swag_var_sum is None:
        raise errors.UsageError("--swag_samples: the checkpoint holds no SWAG statistics; train "
                                "with --swa --swag")
    swag = utils.SWAG(trained.model, max_rank=ckpt.swag_max_rank)
    try:
        swag.set_state_dict(ckpt.average_state())
    except ValueError as e:
        raise errors.CheckpointError(f"cannot read SWAG from the checkpoint: {e}") from None
    if swag.n == 0:
        raise errors.UsageError("--swag_samples: the checkpoint's SWAG holds no model yet (it was "
                                "saved before the first averaged epoch); use a later checkpoint")
    if not diagonal and len(swag.deviations) < 2:
        raise errors.UsageError(f"the checkpoint's SWAG holds {len(swag.deviations)} deviation(s): "
                                "the low-rank term needs 2; pass --swag_diag")
    total, labels, sample = None, None, None
    progress = report.Progress(sys.stderr)
    progress.start("SWAG samples", samples)
    for i in range(samples):
        sample = swag.sample(scale=scale, cov=not diagonal, seed=seed + i, out=sample,
                             rank_divisor=rank_divisor)
        utils.bn_update(trained.refresh_batches(), sample)
        probs, labels = predict(sample, trained.ds, trained.batch_size)
        total = probs if total is None else total + probs
        progress.update(i + 1)
    progress.clear()
    return total / samples, labels, swag


def ensemble(trained, paths):
    """The ensemble of the SGD weights of the checkpoints at `paths` (one architecture and
    dataset, `trained`'s): their predicted probabilities on the test set averaged, as FGE's
    authors do (not logits, not weights). One model is held, each file read once. Returns
    (mean probabilities, labels, each member's scores)."""
    total, labels, members = None, None, []
    for path in paths:
        ckpt = checkpoints.load_checkpoint(path)
        dataset = ckpt.dataset or (ckpt.args or {}).get("dataset")
        if dataset is not None and dataset != trained.ds.name:
            raise errors.UsageError(f"{path} is of {dataset}, the ensemble of {trained.ds.name}: "
                                    "an ensemble needs checkpoints of one dataset")
        checkpoints.load_weights(trained.model, ckpt.state_dict, source=path)
        probs, labels = predict(trained.model, trained.ds, trained.batch_size)
        members.append(scores(probs, labels))
        total = probs if total is None else total + probs
    return total / len(paths), labels, members


# --------------------------------------------------------------------------- figures

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
