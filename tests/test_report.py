"""What a user sees: progress bar, VisualDL logs, metrics.csv, plots, --help, the notebook."""
import errno
import glob
import io
import os
import shutil

import pytest

import train
from harness import report
from helpers import ROOT, run_main, run_script


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_draws_on_a_terminal_only(monkeypatch):
    monkeypatch.delenv("JPY_PARENT_PID", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    terminal = FakeTerminal()
    bar = report.Progress(terminal)
    bar.start("epoch 3/10", total_steps=4)
    for step in range(1, 5):
        bar.update(step, {"loss_sum": 2.0 * step * 8, "count": step * 8})
    bar.clear()
    text = terminal.getvalue()
    assert "epoch 3/10" in text and "4/4" in text and "loss 2.0000" in text
    assert "img/s" in text and "left" in text and text.endswith("\r\x1b[K")
    monkeypatch.setenv("JPY_PARENT_PID", "1")  # a notebook's pseudo-terminal
    for stream in (io.StringIO(), FakeTerminal()):
        quiet = report.Progress(stream)
        quiet.start("epoch 1/1", 1)
        quiet.update(1, {"loss_sum": 1.0, "count": 1})
        quiet.clear()
        assert stream.getvalue() == ""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("report") / "run"
    result = run_script("train.py", "--dataset", "digits", "--model", "SimpleCNN", "--epochs", 5,
                        "--swa", "--swa_start", 3, "--eval_freq", 1, "--dir", directory)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\r" not in result.stdout  # not a terminal: the table only
    assert f"plot: {directory}/convergence.png" in result.stdout
    return directory


def test_metrics_csv_has_every_epoch(run_dir):
    rows = report.read_metrics(str(run_dir))
    assert [r["ep"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["img_s"] > 0 and 0 <= r["wait_pct"] <= 100 and r["te_acc"] is not None for r in rows)
    assert [r["swa_te_acc"] is not None for r in rows] == [False, False, True, True, True]


def test_visualdl_log_holds_the_curves(run_dir):
    from visualdl import LogReader

    files = glob.glob(str(run_dir / "vdl" / "vdlrecords*"))
    assert len(files) == 1
    reader = LogReader(file_path=files[0])
    tags = reader.get_tags()
    assert {"accuracy", "loss"} <= set(tags["scalars"])
    assert {"learning rate", "train images per second"} <= set(tags["scalar"])
    assert [round(p.value, 4) for p in reader.get_data("scalar", "learning rate")] == \
        [round(r["lr"], 4) for r in report.read_metrics(str(run_dir))]
    # train, test SGD each epoch; test SWA from epoch 3: 5 + 5 + 3 points
    assert len(reader.get_data("scalars", "accuracy")) == 13


def _png_size(path):
    with open(path, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_train_and_plot_script_draw_pngs(run_dir, tmp_path):
    one = _png_size(run_dir / "convergence.png")
    out = tmp_path / "both.png"
    result = run_script(os.path.join("scripts", "plot.py"), run_dir, run_dir, "--out", out)
    assert result.returncode == 0, result.stderr
    two = _png_size(out)
    assert two[0] > 1.7 * one[0]  # side by side
    missing = run_script(os.path.join("scripts", "plot.py"), tmp_path / "nothing")
    assert missing.returncode == 2 and "has no metrics.csv" in missing.stderr


RUN_DIR_FLAGS = ["--dataset", "digits", "--model", "SimpleCNN", "--epochs", 5, "--swa", "--swa_start", 3,
                 "--eval_freq", 1]  # run_dir's


def test_a_finished_run_whose_plot_is_missing_draws_it_on_resume(run_dir, tmp_path):
    copy = shutil.copytree(run_dir, tmp_path / "run")
    os.unlink(copy / "convergence.png")
    result = run_main(train.main, *RUN_DIR_FLAGS, "--dir", copy, "--resume", "auto")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "is finished" in result.stdout and f"plot: {copy}/convergence.png (it was missing: drawn again)" in result.stdout
    assert _png_size(copy / "convergence.png") == _png_size(run_dir / "convergence.png")
    again = run_main(train.main, *RUN_DIR_FLAGS, "--dir", copy, "--resume", "auto")
    assert again.returncode == 0 and "plot:" not in again.stdout  # there: left alone


def _leftovers(directory):
    return [n for n in os.listdir(directory) if n.startswith("convergence.png")]


def test_a_full_disk_while_plotting_leaves_no_partial_image_and_names_it(tmp_path, monkeypatch):
    import matplotlib.figure

    def full_disk(self, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"\x89PNG")  # what fitted before the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    run_dir = tmp_path / "run"
    result = run_main(train.main, "--dataset", "digits", "--model", "SimpleCNN", "--epochs", 1,
                      "--no_visualdl", "--dir", run_dir)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert f"no space left on the device writing {run_dir}/convergence.png" in lines[0]
    assert _leftovers(run_dir) == []


@pytest.mark.parametrize("sig, code", [pytest.param("INT", 130, marks=pytest.mark.slow), ("TERM", 143)])
def test_a_signal_while_the_plot_is_written_leaves_no_image_and_resume_draws_it(tmp_path, sig, code):
    run_dir = tmp_path / "run"
    flags = ["--dataset", "digits", "--model", "SimpleCNN", "--epochs", 2, "--no_visualdl"]
    stopped = run_script(os.path.join("tests", "interrupt.py"), "plot", 1, sig, *flags, "--dir", run_dir)
    assert stopped.returncode == code and "Traceback" not in stopped.stderr, stopped.stderr[-2000:]
    message = stopped.stderr.strip().splitlines()[-1]
    assert f"stopped by SIG{sig} while drawing {run_dir}/convergence.png" in message
    assert "--resume auto" in message and _leftovers(run_dir) == []
    resumed = run_main(train.main, *flags, "--dir", run_dir, "--resume", "auto")
    assert resumed.returncode == 0 and "drawn again" in resumed.stdout, resumed.stderr[-2000:]
    assert _png_size(run_dir / "convergence.png")[0] > 100


def test_help_is_grouped_with_defaults_and_an_example():
    text = run_script("train.py", "--help").stdout
    for group in ("run:", "data:", "model and SGD:", "SWA:", "hardware:"):
        assert group in text
    assert "(default: 161)" in text and text.rstrip().splitlines()[-1].startswith("  python train.py")


@pytest.mark.slow
def test_quickstart_notebook_runs_top_to_bottom(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    work = tmp_path / "repo"
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "runs", "out", "ckpt", "exported", "__pycache__", "launch_logs",
        "log"))
    notebook = nbformat.read(str(work / "swa_quickstart.ipynb"), as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(work)}}).execute()
    texts, images = [], 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            assert output.get("output_type") != "error", output
            texts.append(output.get("text", ""))
            images += "image/png" in output.get("data", {})
    text = "".join(texts)
    assert images == 1
    assert "installing" not in text  # Paddle and the rest are here: the install cell is inert
    assert "Paddle 3." in text and "running on CPU" in text
    assert "      60      0.05" in text and "\x1b[K" not in text and "Warning" not in text
    assert "SWA weights (average of 21 models)" in text and "SGD weights" in text
    assert "SWA test accuracy after a fresh BatchNorm refresh" in text
    assert (work / "runs" / "notebook" / "vdl").is_dir()
