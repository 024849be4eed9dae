"""Evaluate a checkpoint on its test set: accuracy, NLL and expected calibration error.

    python eval.py --model_path runs/digits/checkpoint-30.pdparams
    python eval.py --model_path runs/digits/checkpoint-30.pdparams --swag_samples 30

Uses the SWA weights when the checkpoint has them (--sgd for the SGD weights); the model,
dataset and data path come from the checkpoint unless given. With --swag_samples (a run
trained with --swag), SGD, SWA and SWAG's Bayesian model average are compared.
"""
import argparse
import os
import sys

import harness

harness.prepare()  # before Paddle loads: the math library's path, Paddle's import-time warnings
from harness import checkpoints, cli, errors  # noqa: E402
from harness import scoring  # noqa: E402
import utils  # noqa: E402

EXAMPLES = """examples:
  python eval.py --model_path runs/digits/checkpoint-60.pdparams
  python eval.py --model_path runs/digits/checkpoint-60.pdparams --sgd
  python eval.py --model_path runs/swag/checkpoint-60.pdparams --swag_samples 30 --reliability calibration.png
  python eval.py --model_path runs/fge/checkpoint-12.pdparams --ensemble
"""


def build_parser():
    p = cli.ArgumentParser(prog="eval.py", description="Evaluate an SGD/SWA checkpoint on the test set.",
                           epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", metavar="CKPT", type=cli.path_argument,
                   help="checkpoint written by train.py (required, unless --ensemble_of is given)")
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
    swag.add_argument("--swag_scale", type=cli.NON_NEGATIVE_FLOAT, metavar="SCALE",
                      help="covariance scale of the samples (default: the SWAG authors' values, "
                           "0.5 for SWAG, 1 with --swag_diag)")
    swag.add_argument("--swag_diag", action="store_true",
                      help="sample from the diagonal covariance only, SWAG-diagonal (default: off)")
    swag.add_argument("--swag_rank_divisor", choices=utils.SWAG.RANK_DIVISORS,
                      help="divide the low-rank term by sqrt(K - 1), K the deviations held "
                           "(held), or by sqrt(--swag_rank - 1) always, as the authors' code "
                           "does (max_rank); the two differ only before the rank is full "
                           "(default: held)")
    swag.add_argument("--seed", type=cli.SEED, default=0,
                      help="seed of the samples; sample i uses seed + i (default: 0)")
    fge = p.add_argument_group("ensembles (FGE: checkpoints of train.py --fge)")
    fge.add_argument("--ensemble", action="store_true",
                     help="also score the FGE ensemble of the checkpoint's run: the predicted "
                          "probabilities of its snapshots (fge-<epoch>.pdparams beside it) "
                          "averaged, beside SGD and SWA (default: off)")
    fge.add_argument("--ensemble_of", nargs="+", metavar="CKPT", type=cli.path_argument,
                     help="score the ensemble of these checkpoints' SGD weights (one architecture "
                          "and dataset: snapshots, several runs, a deep ensemble) (default: none)")
    p.add_argument("--reliability", metavar="PNG",
                   help="draw reliability diagrams (SGD, SWA and, with --swag_samples, SWAG side "
                        "by side) into this PNG (default: none)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --reliability file (default: off)")
    cli.add_checkpoint_overrides(p, "the checkpoint's")
    return p


# --------------------------------------------------------------------------- the script

def evaluate(args):
    """Score the weights `args` ask for; returns ({"SGD"/"SWA"/"SWAG": scores}, info)."""
    ckpt = checkpoints.load_checkpoint(args.model_path)
    trained = checkpoints.rebuild(ckpt, args.model_path, args.model, args.dataset,
                                  args.data_path, args.batch_size, args.device, args.threads)
    has_swa = ckpt.has_average
    compare = args.swag_samples or args.reliability or args.ensemble
    wanted = [] if args.ensemble_of else ["SGD", "SWA"] if compare else \
        ["SWA" if has_swa and not args.sgd else "SGD"]
    results = {weights: scoring.evaluate_weights(trained, ckpt, weights, args.model_path,
                                                 args.bn_update)
               for weights in wanted if weights == "SGD" or has_swa}
    if args.swag_samples:
        probs, labels, swag = scoring.swag_average(ckpt, trained, args.swag_samples,
                                                   args.swag_scale, args.swag_diag, args.seed,
                                                   args.swag_rank_divisor)
        results["SWAG"] = dict(scoring.scores(probs, labels), count=len(labels), probs=probs,
                               labels=labels, swag_n=swag.n, rank=len(swag.deviations),
                               max_rank=swag.max_rank)
    members = ensemble_paths(args, ckpt)
    if members:
        probs, labels, _ = scoring.ensemble(trained, members)
        results["FGE" if args.ensemble else "ensemble"] = dict(
            scoring.scores(probs, labels), count=len(labels), probs=probs, labels=labels,
            members=[os.path.basename(p) for p in members])
    info = dict(model=trained.model_name, dataset=trained.ds.name, swa_n=ckpt.swa_n,
                position=checkpoints.describe_position(ckpt.epoch, ckpt.step))
    return results, info


def ensemble_paths(args, ckpt):
    """The checkpoints of the ensemble asked for: --ensemble_of's, or with --ensemble the FGE
    snapshots the checkpoint lists (beside it); UsageError if it lists none."""
    if args.ensemble_of:
        return list(args.ensemble_of)
    if not args.ensemble:
        return []
    names = ckpt.fge_snapshots or []
    if not names:
        raise errors.UsageError(f"--ensemble: {args.model_path} lists no FGE snapshot (train "
                                "with --fge, and use a checkpoint after the first snapshot)")
    return [os.path.join(os.path.dirname(os.path.abspath(args.model_path)), n) for n in names]


def describe(weights, result, info, args):
    if weights == "SGD":
        return "SGD weights" + (" (BatchNorm statistics recomputed)" if result["refreshed"] else "")
    if weights == "SWA":
        return f"SWA weights (average of {info['swa_n']} models" + (
            ", BatchNorm statistics recomputed)" if result["refreshed"] else ")")
    if weights in ("FGE", "ensemble"):
        kind = "FGE ensemble of" if weights == "FGE" else "ensemble of"
        return (f"{kind} {len(result['members'])} checkpoints "
                f"({', '.join(result['members'])}; probabilities averaged)")
    kind = "diagonal" if args.swag_diag else f"diagonal + rank {result['rank']}"
    if args.swag_rank_divisor == "max_rank":
        kind += f" divided by sqrt({result['max_rank']} - 1)"
    return (f"SWAG ({args.swag_samples} samples, scale {args.swag_scale:g}, {kind} covariance, "
            f"from {result['swag_n']} models)")


def check_flags(args):
    """Refuse contradicting flags and an unwritable --reliability before any work."""
    if not (args.model_path or args.ensemble_of):
        raise errors.UsageError("give --model_path CKPT (or --ensemble_of CKPT ...)")
    if args.ensemble and args.ensemble_of:
        raise errors.UsageError("--ensemble scores a run's FGE snapshots, --ensemble_of the "
                                "checkpoints given: choose one")
    args.model_path = args.model_path or args.ensemble_of[0]
    if args.reliability:
        cli.check_output(args.reliability, "--reliability", args.overwrite,
                         (".png", ".pdf", ".svg", ".jpg", ".jpeg"), what="figure")
    shaping = [f"--{name}" for name in ("swag_diag", "swag_scale", "swag_rank_divisor")
               if getattr(args, name) not in (None, False)]
    if shaping and not args.swag_samples:
        verb = "shape" if len(shaping) > 1 else "shapes"
        raise errors.UsageError(f"{' and '.join(shaping)} {verb} the SWAG samples: add --swag_samples S")
    if args.swag_diag and args.swag_rank_divisor:
        raise errors.UsageError("--swag_rank_divisor divides the low-rank term, which --swag_diag "
                                "drops: choose one")
    if args.swag_scale is None:  # the authors' values (swa_gaussian's uncertainty experiments)
        args.swag_scale = utils.SWAG.SCALE_DIAGONAL if args.swag_diag else utils.SWAG.SCALE
    args.swag_rank_divisor = args.swag_rank_divisor or "held"
    if args.sgd and (args.swag_samples or args.reliability or args.ensemble or args.ensemble_of):
        flag = next(f"--{name}" for name in ("swag_samples", "reliability", "ensemble", "ensemble_of")
                    if getattr(args, name))
        raise errors.UsageError(f"--sgd chooses the weights of a single evaluation; {flag} "
                                "compares SGD and SWA (and SWAG) side by side: drop --sgd")


def run(argv):
    args = build_parser().parse_args(argv)
    check_flags(args)
    results, info = evaluate(args)
    print(f"{info['model']} at {info['position']}, {info['dataset']} test set "
          f"({next(iter(results.values()))['count']} images)")
    for weights, r in results.items():
        print(f"{describe(weights, r, info, args)}: {scoring.format_scores(r)}")
    if args.reliability:
        print(f"reliability diagrams: {scoring.plot_reliability(results, args.reliability)}")
    return 0


def main(argv=None):
    return cli.main("eval.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
