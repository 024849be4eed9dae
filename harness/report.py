"""What a training run shows and records: the per-epoch table, a progress bar on a terminal,
metrics.csv, VisualDL logs and the convergence plot.
"""
import csv
import io
import os
import shlex
import signal
import sys
import time

from harness import files

AVERAGES = {"swa": "SWA", "ema": "EMA"}  # column prefix -> what the average is


SPLITS = {"te": "test", "val": "validation"}  # column infix -> the set evaluated each epoch


def columns(average=None, split="te", skipped=False):
    """The table's columns: the SGD model's on `split` (`te_*` test, `val_*` validation), the
    average's (`swa_te_*` for SWA, `ema_te_*` for an EMA) only when there is one, and the
    steps the float16 loss scaler skipped (`skipped`) only when there is one."""
    middle = [f"{average}_{split}_loss", f"{average}_{split}_acc"] if average else []
    return (["ep", "lr", "tr_loss", "tr_acc", f"{split}_loss", f"{split}_acc"] + middle
            + (["skipped"] if skipped else []) + ["time"])


def split_of(row_keys):
    """The set a metrics row's evaluation columns are of ('te' or 'val')."""
    return "val" if "val_acc" in row_keys else "te"


def average_kind(row_keys):
    """The prefix of the average whose columns a metrics row has ('swa', 'ema'), or None."""
    split = split_of(row_keys)
    return next((p for p in AVERAGES if f"{p}_{split}_acc" in row_keys), None)


def format_row(row, columns, header=False):
    """One line of the per-epoch table; None prints as blank."""
    cells = []
    for column in columns:
        value = column if header else row.get(column)
        if value is None:
            text = ""
        elif header:
            text = column
        elif column in ("ep", "skipped"):
            text = str(int(value))
        elif column == "lr":
            text = f"{value:.4g}"
        elif column == "time":
            text = f"{value:.1f}"
        else:
            text = f"{value:.4f}"
        cells.append(text.rjust(max(len(column), 8)))
    return "  ".join(cells)


class MetricsFile:
    """metrics.csv in the run directory: one row per epoch, the columns of `columns(...)`,
    training images/s and the percentage of the training pass its steps waited for batches
    (`wait_pct`: near 0 when loading keeps up)."""

    def __init__(self, directory, table_columns, keep_through_epoch=0):
        self.path = os.path.join(directory, "metrics.csv")
        self.columns = [c for c in table_columns] + ["img_s", "wait_pct"]
        rows = []
        if keep_through_epoch and os.path.exists(self.path):
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["ep"]) <= keep_through_epoch]
        # Rewritten whole, then renamed: rows of epochs a resumed run repeats are dropped, and
        # a full disk leaves the old file as it was (and no temporary file behind).
        def write(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
        files.atomic_write(self.path, write)

    def append(self, row):
        line = io.StringIO()
        csv.DictWriter(line, self.columns, extrasaction="ignore").writerow(
            {k: ("" if v is None else v) for k, v in row.items()})
        with open(self.path, "a", newline="") as f:
            f.write(line.getvalue())  # the row in one write call


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

    def start(self, title, total_steps, first_step=0):
        """Begin a bar of `total_steps` (e.g. title "epoch 3/10"), `first_step` already done."""
        self.title, self.total = title, total_steps
        self.first, self.started = first_step, time.perf_counter()

    def update(self, steps_done, sums=None):
        """After `steps_done` steps; `sums` (as engine.Sums keeps them) adds loss and images/s."""
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.1 and steps_done < self.total):
            return
        self.last = now
        elapsed = max(now - self.started, 1e-9)
        done_here = max(steps_done - self.first, 1)
        left = elapsed / done_here * (self.total - steps_done)
        filled = int(self.width * steps_done / max(self.total, 1))
        rates = ""
        if sums is not None:
            loss = sums["loss_sum"] / max(sums["count"], 1)
            rates = f"  loss {loss:.4f}  {sums['count'] / elapsed:,.0f} img/s"
        line = (f"{self.title} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{steps_done}/{self.total}{rates}  {int(left) // 60}:{int(left) % 60:02d} left")
        self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()
        self.drawn = True

    def clear(self):
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False


class VisualDLLog:
    """Per-epoch scalars for VisualDL in `<dir>/vdl`: SGD and the average share a chart per
    metric ("test SWA" or "test EMA")."""

    def __init__(self, directory, average="swa"):
        from visualdl import LogWriter  # imported here: 0.2 s, and only runs that log need it

        self.writer = LogWriter(logdir=os.path.join(directory, "vdl"))
        self.average = average or "swa"

    def command(self):
        """The shell command that shows these logs."""
        return f"visualdl --logdir {shlex.quote(self.writer.logdir)}"

    def add(self, row):
        step, split = row["ep"], split_of(row)
        names = ("train", f"{SPLITS[split]} SGD", f"{SPLITS[split]} {AVERAGES[self.average]}")
        for metric, chart in (("acc", "accuracy"), ("loss", "loss")):
            keys = (f"tr_{metric}", f"{split}_{metric}", f"{self.average}_{split}_{metric}")
            values = {name: row[key] for name, key in zip(names, keys)
                      if row.get(key) is not None}
            self.writer.add_scalars(chart, values, step)
        self.writer.add_scalar("learning rate", row["lr"], step)
        if row.get("img_s"):
            self.writer.add_scalar("train images per second", row["img_s"], step)

    def close(self):
        self.writer.close()


def plot_runs(directories, out):
    """Draw test error of SGD and SWA against epochs, learning rate below, one column per run.

    Args:
        directories: run directories holding metrics.csv.
        out: PNG path to write (atomically: see files.atomic_write).

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
    drawn = []  # (axis, points, colour) of every error curve, to mark what runs off the top
    for column, directory in enumerate(directories):
        rows = read_metrics(directory)
        top, bottom = axes[0][column], axes[1][column]
        split = split_of(rows[0].keys() if rows else ())
        average = average_kind(rows[0].keys() if rows else ()) or "swa"
        for key, label, style in ((f"{split}_acc", "SGD", dict(color="tab:blue", marker="o")),
                                  (f"{average}_{split}_acc", AVERAGES[average],
                                   dict(color="tab:red", marker="s"))):
            points = [(r["ep"], 100.0 - r[key]) for r in rows if r.get(key) is not None]
            if points:
                top.plot(*zip(*points), label=label, markersize=3, linewidth=1.5, **style)
                late += [e for ep, e in points if ep > 0.25 * rows[-1]["ep"]]
                drawn.append((top, points, style["color"]))
        swa_start = _swa_start(directory)
        for axis in (top, bottom):
            if swa_start is not None:
                axis.axvline(swa_start, color="gray", linestyle=":", linewidth=1)
        top.set_title(os.path.basename(os.path.normpath(directory)))
        top.set_ylabel(f"{SPLITS[split]} error (%)")
        top.grid(alpha=0.3)
        top.legend(title=None if swa_start is None else f"averaging from epoch {swa_start}")
        bottom.plot([r["ep"] for r in rows], [r["lr"] for r in rows], color="black", linewidth=1.2)
        bottom.set_xlabel("epoch")
        bottom.set_ylabel("learning rate")
        bottom.grid(alpha=0.3)
    if late:  # the first epochs' errors would flatten the rest: let them run off the top
        spread = max(late) - min(late)
        axes[0][0].set_ylim(max(0.0, min(late) - 0.5 * spread - 0.1), max(late) + 0.5 * spread + 0.1)
        mark_off_the_top(drawn)
    # Drawn to a temporary file and renamed: a full disk or a stop leaves no partial image.
    kind = os.path.splitext(out)[1][1:].lower() or "png"  # the temporary name says nothing
    try:
        files.atomic_write(out, lambda tmp: fig.savefig(tmp, format=kind, dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return out


def mark_off_the_top(drawn):
    """A triangle at the top edge for every point above the error axis, and a note saying
    so: a capped axis must not hide the early epochs' errors."""
    for axis, points, colour in drawn:
        ceiling = axis.get_ylim()[1]
        above = [ep for ep, error in points if error > ceiling]
        if above:
            axis.plot(above, [ceiling] * len(above), linestyle="none", marker="^", color=colour,
                      markersize=5, clip_on=False)
            axis.annotate("\u25b2 above the axis", (0.01, 0.97), xycoords="axes fraction",
                          va="top", fontsize=8, color="gray")


def _swa_start(directory):
    """The run's first averaged epoch, from its args.json, or None."""
    saved = files.read_json_dict(os.path.join(directory, "args.json")) or {}
    return saved.get("swa_start") if saved.get("swa") else None


# --------------------------------------------------------------------------- the run's plot

class Stopped(Exception):
    """SIGTERM or SIGINT arrived while `draw_plot` drew; `signum` is the signal."""

    def __init__(self, signum, path):
        super().__init__(f"stopped by {signal.Signals(signum).name} while drawing {path}, which "
                         "was not written; the training is finished: draw the plot with the same "
                         "command plus --resume auto")
        self.signum = signum


PLOT = "convergence.png"


def draw_plot(directory):
    """Draw DIR/convergence.png from DIR/metrics.csv (atomically); returns its path. A signal
    meanwhile stops the drawing at once, raising Stopped: matplotlib cannot be asked to stop
    early, and the default handlers would kill the process or raise KeyboardInterrupt inside
    it. Nothing is written then, and a resume of the finished run draws it."""
    path = os.path.join(directory, PLOT)

    def stop(signum, frame):
        raise Stopped(signum, path)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return plot_runs([directory], path)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def draw_missing_plot(directory):
    """For a finished run: draw its plot if a stop or a full disk lost it. Returns a line
    saying so (after a newline), or ''."""
    if os.path.exists(os.path.join(directory, PLOT)) or \
            not os.path.exists(os.path.join(directory, "metrics.csv")):
        return ""
    return f"\nplot: {draw_plot(directory)} (it was missing: drawn again)"
