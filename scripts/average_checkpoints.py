"""Average saved checkpoints offline (equal weights), optionally refresh BatchNorm, evaluate.

    python scripts/average_checkpoints.py runs/a/checkpoint-150.pdparams runs/a/checkpoint-175.pdparams \
        runs/a/checkpoint-200.pdparams --out runs/a/averaged.pdparams --bn_update

Averages each checkpoint's SGD weights (every floating-point tensor, as `utils.SWA` does),
refusing checkpoints of different architectures. With --bn_update the BatchNorm statistics
are recomputed on the training set. The result is evaluated on the test set and saved as a
checkpoint that eval.py reads (its SWA weights are the average). Writing into a run
directory takes its lock: while train.py writes there this script refuses, and the other
way round.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness  # noqa: E402

harness.prepare()  # before Paddle loads: the math library's path, Paddle's import-time warnings
import utils  # noqa: E402
from harness import checkpoints, cli, errors, rundir  # noqa: E402
from harness import scoring  # noqa: E402


def build_parser():
    p = cli.ArgumentParser(prog="average_checkpoints.py", description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoints written by train.py")
    p.add_argument("--out", required=True, type=cli.path_argument,
                   help="where to write the averaged checkpoint (required)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: off)")
    p.add_argument("--bn_update", action="store_true",
                   help="recompute BatchNorm statistics on the training set (default: keep the "
                        "averaged statistics)")
    cli.add_checkpoint_overrides(p, "the first checkpoint's")
    return p


def check_out(args):
    """Refuse an --out that cannot or must not be written, before any work; returns the lock
    of the run directory it is in, if it is in one."""
    out = os.path.abspath(args.out)
    folder = os.path.dirname(out)
    if out in {os.path.abspath(c) for c in args.checkpoints}:
        raise errors.UsageError(f"--out {args.out} is one of the inputs; write the average elsewhere")
    cli.check_output(args.out, "--out", args.overwrite, make_folder=False)
    is_run_dir = rundir.previous_run_files(folder) or os.path.exists(os.path.join(folder, rundir.LOCK))
    return rundir.acquire_lock(folder) if is_run_dir else None


def average(args):
    lock = check_out(args)  # held while the average is made and written
    try:
        result = _average(args)
        if lock:  # written into a run directory: part of its run from now on
            rundir.record_average(os.path.dirname(os.path.abspath(args.out)),
                                  os.path.basename(args.out))
        return result
    finally:
        if lock:
            lock.close()


def _average(args):
    first = checkpoints.load_checkpoint(args.checkpoints[0])
    trained = checkpoints.rebuild(first, args.checkpoints[0], args.model, args.dataset,
                                  args.data_path, args.batch_size, args.device, args.threads)
    swa = utils.SWA(trained.model)
    epochs = []
    for path in args.checkpoints:
        ckpt = first if path == args.checkpoints[0] else checkpoints.load_checkpoint(path)
        checkpoints.check_weights(ckpt.state_dict, source=path)
        try:
            utils.load_state_dict(trained.model, ckpt.state_dict, source=path)
        except ValueError as e:
            raise errors.CheckpointError(f"{e}: all checkpoints must hold the same "
                                         "architecture") from None
        swa.update(trained.model)
        epochs.append(ckpt.epoch)
    trained.epoch = max(epochs)  # the refresh eval.py would draw for the output checkpoint
    if args.bn_update:
        swa.bn_update(trained.refresh_batches())
    scores = scoring.test_scores(swa.model, trained.ds, trained.batch_size)
    checkpoints.write_checkpoint(args.out, checkpoints.Checkpoint(
        epoch=max(epochs), state_dict=swa.model.state_dict(), optimizer={},
        **swa.state_dict(), args=first.args,
        **checkpoints.setting_of(trained.model_name, trained.ds),
        averaged_from=[os.path.abspath(c) for c in args.checkpoints]))
    return swa, epochs, scores, trained.ds


def run(argv):
    args = build_parser().parse_args(argv)
    swa, epochs, scores, ds = average(args)
    statistics = "recomputed" if swa.bn_updated else "averaged (use --bn_update to recompute)"
    print(f"averaged {swa.n} checkpoints (epochs {', '.join(map(str, epochs))}); BatchNorm "
          f"statistics {statistics}; wrote {args.out}")
    print(f"{ds.name} test set ({scores['count']} images): {scoring.format_scores(scores)}")
    return 0


def main(argv=None):
    return cli.main("average_checkpoints.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
