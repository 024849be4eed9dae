"""Plot test error of SGD and SWA against epochs, with the learning rate below.

    python scripts/plot.py runs/digits                      # writes runs/digits/convergence.png
    python scripts/plot.py runs/sgd runs/swa --out compare.png   # runs side by side

Reads each run directory's metrics.csv (written by train.py).
"""
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import cli, report  # noqa: E402


def main(argv=None):
    p = cli.ArgumentParser(prog="plot.py", description=__doc__.split("\n")[0])
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run directories holding metrics.csv")
    p.add_argument("--out", help="PNG to write (default: DIR/convergence.png for one run, "
                                 "convergence.png for several)")
    args = p.parse_args(argv)
    for directory in args.dirs:
        if not os.path.isfile(os.path.join(directory, "metrics.csv")):
            print(f"plot.py: error: {directory} has no metrics.csv; give run directories written "
                  "by train.py", file=sys.stderr)
            return 2
        try:
            rows = report.read_metrics(directory)
        except (OSError, ValueError, KeyError, csv.Error):
            rows = None
        if not rows or not {"ep", "lr", report.split_of(rows[0]) + "_acc"} <= set(rows[0]):
            print(f"plot.py: error: {os.path.join(directory, 'metrics.csv')} holds no rows of "
                  "train.py's table (ep, lr, te_acc or val_acc); give run directories written by "
                  "train.py", file=sys.stderr)
            return 2
    out = args.out or (os.path.join(args.dirs[0], "convergence.png") if len(args.dirs) == 1
                       else "convergence.png")
    try:
        print(report.plot_runs(args.dirs, out))
    except (OSError, ValueError, KeyError) as e:
        print(f"plot.py: error: cannot plot ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
