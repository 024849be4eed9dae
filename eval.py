"""Evaluate a checkpoint on its test set: accuracy, NLL and expected calibration error.

    python eval.py --model_path runs/digits/checkpoint-30.pdparams

Uses the SWA weights when the checkpoint has them (--sgd for the SGD weights); the model,
dataset and data path come from the checkpoint unless given.
"""
import argparse
import sys

import numpy as np
import runtime  # first: quiets Paddle's import-time warnings

import data as datasets
import models
import report
import utils


class UsageError(Exception):
    """Bad input, reported as one line with exit code 2."""


def build_parser():
    p = report.ArgumentParser(prog="eval.py", description="Evaluate an SGD/SWA checkpoint on the test set.",
                epilog="example:\n  python eval.py --model_path runs/digits/checkpoint-30.pdparams",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, metavar="CKPT",
                   help="checkpoint written by train.py (required)")
    p.add_argument("--sgd", action="store_true",
                   help="evaluate the SGD weights even if the checkpoint has SWA weights (default: off)")
    p.add_argument("--bn_update", action="store_true",
                   help="recompute the SWA BatchNorm statistics even if the checkpoint has them "
                        "(default: only when they are stale)")
    add_overrides(p, "the checkpoint's")
    p.add_argument("--batch_size", type=int, help="batch size (default: the checkpoint's, else 128)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="CPU threads; 0 chooses automatically (default: 0)")
    return p


def add_overrides(parser, source):
    """Flags that override what a checkpoint says about its model, data and device."""
    parser.add_argument("--dataset", help=f"dataset (default: {source})")
    parser.add_argument("--data_path", metavar="PATH", help=f"dataset folder (default: {source})")
    parser.add_argument("--model", help=f"model name (default: {source})")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                        help="auto uses the GPU when Paddle has one (default: auto)")


def calibration_error(probs, labels, bins=15):
    """Expected calibration error: sum over equal-width confidence bins of
    (fraction of samples in the bin) * |accuracy - mean confidence|, as a fraction."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(error)


def scores(logits, labels, bins=15):
    """Accuracy (%), NLL and ECE (%) of `logits` for integer `labels`."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    probs = np.exp(log_probs)
    return {"accuracy": 100.0 * float((logits.argmax(axis=1) == labels).mean()),
            "nll": float(-log_probs[np.arange(len(labels)), labels].mean()),
            "ece": 100.0 * calibration_error(probs, labels, bins)}


def _setting(given, ckpt_args, key, default=None):
    return given if given is not None else (ckpt_args or {}).get(key, default)


def model_for(ckpt, path, model_name=None, dataset=None, data_path=None, device="auto", threads=0):
    """Load the dataset and build the (empty) model a checkpoint was trained with.

    Flags given override what the checkpoint says. Returns (model, data, model name).
    """
    saved = ckpt.get("args") or {}
    model_name = model_name or ckpt.get("model_name") or saved.get("model")
    dataset = dataset or ckpt.get("dataset") or saved.get("dataset")
    if model_name is None or dataset is None:
        raise UsageError(f"{path} does not say which model and dataset it holds; "
                         "pass --model and --dataset")
    if runtime.select_device(device) == "cpu":
        runtime.tune_cpu(threads, model_name)
    ds = datasets.load_dataset(dataset, _setting(data_path, saved, "data_path", "data"),
                               download=not saved.get("no_download", False))
    try:
        model = models.build(model_name, ds.num_classes, ds.image_shape[0])
    except ValueError as e:
        raise UsageError(str(e)) from None
    return model, ds, model_name


def refresh_batch_norm(model, ds, batch_size, seed=1, epoch=0):
    """Recompute `model`'s BatchNorm statistics on the training set, as train.py does.
    Returns the number of images seen (0 for a model without BatchNorm)."""
    batches = datasets.Batches(ds.train, batch_size, ds.mean, ds.std, shuffle=True,
                               augment=ds.augment, seed=seed)
    return utils.bn_update(batches(epoch, stream=1), model)


def test_scores(model, ds, batch_size):
    """Accuracy (%), NLL, ECE (%) and count of `model` on the test set."""
    result = utils.run_epoch(datasets.Batches(ds.test, batch_size, ds.mean, ds.std)(), model,
                             keep_logits=True)
    return dict(scores(result["logits"], result["labels"]), count=result["count"])


def evaluate(args):
    ckpt = utils.load_checkpoint(args.model_path)
    saved = ckpt.get("args") or {}
    model, ds, model_name = model_for(ckpt, args.model_path, args.model, args.dataset,
                                      args.data_path, args.device, args.threads)
    use_swa = bool(ckpt.get("swa_n")) and ckpt.get("swa_state_dict") is not None and not args.sgd
    try:
        utils.load_weights(model, ckpt["swa_state_dict" if use_swa else "state_dict"],
                           source=args.model_path)
    except ValueError as e:
        raise utils.CheckpointError(str(e)) from None
    batch_size = _setting(args.batch_size, saved, "batch_size", 128)
    refreshed = False
    if use_swa and (args.bn_update or not ckpt.get("swa_bn_updated", False)):
        # The average's BatchNorm statistics are stale: recompute them as train.py would.
        refreshed = refresh_batch_norm(model, ds, batch_size, saved.get("seed", 1),
                                       int(ckpt["epoch"])) > 0
    result = test_scores(model, ds, batch_size)
    result.update(weights="SWA" if use_swa else "SGD", model=model_name, dataset=ds.name,
                  swa_n=ckpt.get("swa_n"), refreshed=refreshed, epoch=ckpt["epoch"])
    return result


def format_scores(r):
    return f"accuracy {r['accuracy']:.4f}%  NLL {r['nll']:.4f}  ECE {r['ece']:.4f}% (15 bins)"


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        r = evaluate(args)
    except (UsageError, datasets.DataError, utils.CheckpointError, runtime.DeviceError) as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    detail = f" (average of {r['swa_n']} models" + (
        ", BatchNorm statistics recomputed)" if r["refreshed"] else ")") if r["weights"] == "SWA" else ""
    print(f"{r['weights']} weights{detail}, {r['model']} after epoch {r['epoch']}, "
          f"{r['dataset']} test set ({r['count']} images)")
    print(format_scores(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
