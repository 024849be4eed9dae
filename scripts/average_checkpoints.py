"""Average saved checkpoints offline (equal weights), optionally refresh BatchNorm, evaluate.

    python scripts/average_checkpoints.py runs/a/checkpoint-150.pdparams runs/a/checkpoint-175.pdparams \
        runs/a/checkpoint-200.pdparams --out runs/a/averaged.pdparams --bn_update

Averages each checkpoint's SGD weights (every floating-point tensor, as `utils.SWA` does),
refusing checkpoints of different architectures. With --bn_update the BatchNorm statistics
are recomputed on the training set. The result is evaluated on the test set when the
dataset is known (from the checkpoints or --dataset) and saved as a checkpoint that eval.py
reads (its SWA weights are the average).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import runtime  # noqa: E402  (first: quiets Paddle's import-time warnings)
import data as datasets  # noqa: E402
import eval as evaluation  # noqa: E402
import report  # noqa: E402
import utils  # noqa: E402


class UsageError(Exception):
    """Bad input, reported as one line with exit code 2."""


def build_parser():
    p = report.ArgumentParser(prog="average_checkpoints.py", description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoints written by train.py")
    p.add_argument("--out", required=True, help="where to write the averaged checkpoint (required)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: off)")
    p.add_argument("--bn_update", action="store_true",
                   help="recompute BatchNorm statistics on the training set (default: keep the "
                        "averaged statistics)")
    evaluation.add_overrides(p, "the first checkpoint's")
    p.add_argument("--batch_size", type=int, default=128, help="batch size (default: 128)")
    return p


def average(args):
    out = os.path.abspath(args.out)
    if out in {os.path.abspath(c) for c in args.checkpoints}:
        raise UsageError(f"--out {args.out} is one of the inputs; write the average elsewhere")
    if os.path.exists(out) and not args.overwrite:
        raise UsageError(f"--out {args.out} exists; choose another path or pass --overwrite")
    first = utils.load_checkpoint(args.checkpoints[0])
    model, ds, model_name = evaluation.model_for(first, args.checkpoints[0], args.model,
                                                 args.dataset, args.data_path, args.device)
    swa = utils.SWA(model)
    epochs = []
    for path in args.checkpoints:
        ckpt = first if path == args.checkpoints[0] else utils.load_checkpoint(path)
        try:
            utils.load_weights(model, ckpt["state_dict"], source=path)
        except ValueError as e:
            raise utils.CheckpointError(f"{e}: all checkpoints must hold the same architecture") from None
        swa.update(model)
        epochs.append(int(ckpt["epoch"]))
    if args.bn_update:
        swa.bn_update(datasets.Batches(ds.train, args.batch_size, ds.mean, ds.std, shuffle=True,
                                       augment=ds.augment, seed=1)(epoch=0, stream=1))
    scores = evaluation.test_scores(swa.model, ds, args.batch_size)
    utils.atomic_save(dict(
        format=utils.CHECKPOINT_FORMAT, epoch=max(epochs), step=0,
        state_dict=swa.model.state_dict(), optimizer={}, **swa.state_dict(),
        args=first.get("args"), model_name=model_name, dataset=ds.name,
        num_classes=ds.num_classes, in_channels=ds.image_shape[0],
        averaged_from=[os.path.abspath(c) for c in args.checkpoints]), out)
    return swa, epochs, scores, ds


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        swa, epochs, scores, ds = average(args)
    except (UsageError, datasets.DataError, utils.CheckpointError, runtime.DeviceError,
            evaluation.UsageError) as e:
        print(f"average_checkpoints.py: error: {e}", file=sys.stderr)
        return 2
    statistics = "recomputed" if swa.bn_updated else "averaged (use --bn_update to recompute)"
    print(f"averaged {swa.n} checkpoints (epochs {', '.join(map(str, epochs))}); BatchNorm "
          f"statistics {statistics}; wrote {args.out}")
    print(f"{ds.name} test set ({scores['count']} images): {evaluation.format_scores(scores)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
