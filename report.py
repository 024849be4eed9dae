"""What a training run shows and records: the per-epoch table, a progress bar on a terminal,
metrics.csv, VisualDL logs and the convergence plot.
"""
import argparse
import csv
import json
import os
import sys
import time

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (the problem and where to look), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


COLUMNS = ["ep", "lr", "tr_loss", "tr_acc", "te_loss", "te_acc", "swa_te_loss", "swa_te_acc", "time"]
CSV_COLUMNS = COLUMNS + ["img_s"]


def format_row(row, columns, header=False):
    """One line of the per-epoch table; None prints as blank."""
    cells = []
    for column in columns:
        value = column if header else row.get(column)
        if value is None:
            text = ""
        elif header or column == "ep":
            text = str(value)
        elif column == "lr":
            text = f"{value:.4g}"
        elif column == "time":
            text = f"{value:.1f}"
        else:
            text = f"{value:.4f}"
        cells.append(text.rjust(max(len(column), 8)))
    return "  ".join(cells)


class MetricsFile:
    """metrics.csv in the run directory: one row per epoch."""

    def __init__(self, directory, keep_through_epoch=0):
        self.path = os.path.join(directory, "metrics.csv")
        rows = []
        if keep_through_epoch and os.path.exists(self.path):
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["ep"]) <= keep_through_epoch]
        # Rewritten whole, then renamed: rows of epochs a resumed run repeats are dropped.
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)

    def append(self, row):
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore").writerow(
                {k: ("" if v is None else v) for k, v in row.items()})


def read_metrics(directory):
    """The rows of `directory`/metrics.csv as dicts of floats (None where blank)."""
    with open(os.path.join(directory, "metrics.csv"), newline="") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
                for row in csv.DictReader(f)]


class Progress:
    """A progress bar for the batches of an epoch, redrawn in place on a terminal.

    Silent when the stream is not a terminal (logs, CI) or is a notebook's (`!python ...`
    in Jupyter gets a pseudo-terminal, but saved outputs would keep every redraw), where
    the table's one row per epoch is the output.
    """

    def __init__(self, stream=None, enabled=None, width=24):
        self.stream = stream or sys.stdout
        if enabled is None:
            in_notebook = "JPY_PARENT_PID" in os.environ  # exported by Jupyter kernels
            enabled = (self.stream.isatty() and not in_notebook
                       and os.environ.get("TERM") != "dumb")
        self.enabled = enabled
        self.width, self.drawn, self.last = width, False, 0.0

    def start(self, epoch, epochs, total_steps, first_step=0):
        self.epoch, self.epochs, self.total = epoch, epochs, total_steps
        self.first, self.started = first_step, time.perf_counter()

    def update(self, steps_done, sums):
        """After `steps_done` of the epoch's batches; `sums` as run_epoch keeps them."""
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.1 and steps_done < self.total):
            return
        self.last = now
        elapsed = max(now - self.started, 1e-9)
        done_here = max(steps_done - self.first, 1)
        left = elapsed / done_here * (self.total - steps_done)
        filled = int(self.width * steps_done / max(self.total, 1))
        loss = sums["loss_sum"] / max(sums["count"], 1)
        line = (f"epoch {self.epoch}/{self.epochs} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{steps_done}/{self.total}  loss {loss:.4f}  {sums['count'] / elapsed:,.0f} img/s  "
                f"{int(left) // 60}:{int(left) % 60:02d} left")
        self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()
        self.drawn = True

    def clear(self):
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False


class VisualDLLog:
    """Per-epoch scalars for VisualDL in `<dir>/vdl`: SGD and SWA share a chart per metric."""

    def __init__(self, directory):
        from visualdl import LogWriter  # imported here: 0.2 s, and only runs that log need it

        self.writer = LogWriter(logdir=os.path.join(directory, "vdl"))

    def add(self, row):
        step = row["ep"]
        for metric, keys in (("accuracy", ("tr_acc", "te_acc", "swa_te_acc")),
                             ("loss", ("tr_loss", "te_loss", "swa_te_loss"))):
            values = {name: row[key] for name, key in zip(("train", "test SGD", "test SWA"), keys)
                      if row.get(key) is not None}
            self.writer.add_scalars(metric, values, step)
        self.writer.add_scalar("learning rate", row["lr"], step)
        if row.get("img_s"):
            self.writer.add_scalar("train images per second", row["img_s"], step)

    def close(self):
        self.writer.close()


def plot_runs(directories, out):
    """Draw test error of SGD and SWA against epochs, learning rate below, one column per run.

    Args:
        directories: run directories holding metrics.csv.
        out: PNG path to write.

    Returns:
        `out`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(directories), figsize=(5.5 * len(directories), 5.5),
                             sharex="col", sharey="row", squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08})
    late = []  # test errors after the first quarter of each run, for the shared error axis
    for column, directory in enumerate(directories):
        rows = read_metrics(directory)
        top, bottom = axes[0][column], axes[1][column]
        for key, label, style in (("te_acc", "SGD", dict(color="tab:blue", marker="o")),
                                  ("swa_te_acc", "SWA", dict(color="tab:red", marker="s"))):
            points = [(r["ep"], 100.0 - r[key]) for r in rows if r.get(key) is not None]
            if points:
                top.plot(*zip(*points), label=label, markersize=3, linewidth=1.5, **style)
                late += [e for ep, e in points if ep > 0.25 * rows[-1]["ep"]]
        swa_start = _swa_start(directory)
        for axis in (top, bottom):
            if swa_start is not None:
                axis.axvline(swa_start, color="gray", linestyle=":", linewidth=1)
        top.set_title(os.path.basename(os.path.normpath(directory)))
        top.set_ylabel("test error (%)")
        top.grid(alpha=0.3)
        top.legend(title=None if swa_start is None else f"averaging from epoch {swa_start}")
        bottom.plot([r["ep"] for r in rows], [r["lr"] for r in rows], color="black", linewidth=1.2)
        bottom.set_xlabel("epoch")
        bottom.set_ylabel("learning rate")
        bottom.grid(alpha=0.3)
    if late:  # the first epochs' errors would flatten the rest: let them run off the top
        spread = max(late) - min(late)
        axes[0][0].set_ylim(max(0.0, min(late) - 0.5 * spread - 0.1), max(late) + 0.5 * spread + 0.1)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def _swa_start(directory):
    """The run's first averaged epoch, from its args.json, or None."""
    try:
        with open(os.path.join(directory, "args.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    return saved.get("swa_start") if saved.get("swa") else None
