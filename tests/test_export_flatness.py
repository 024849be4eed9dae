"""scripts/export.py (Paddle Inference) and scripts/flatness.py on a digits checkpoint."""
import csv
import re

import numpy as np
import paddle
import pytest

from harness import checkpoints
from harness import data
import eval as evaluation
import models
import train
from helpers import one_line_error, run_main, script


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    result = run_main(train.main, "--dataset", "digits", "--model", "SimpleCNN", "--epochs", "5",
                      "--swa", "--swa_start", "3", "--eval_freq", "5", "--no_visualdl", "--dir", run_dir)
    assert result.returncode == 0, result.stderr
    return run_dir / "checkpoint-5.pdparams"


def _swa_logits(checkpoint, images):
    """The checkpoint's SWA model on the test images, normalised as in training (by hand)."""
    ckpt = checkpoints.load_checkpoint(str(checkpoint))
    model = models.build("SimpleCNN", 10, 1)
    checkpoints.load_weights(model, ckpt.swa_state_dict)
    model.eval()
    mean, std = (np.array(ckpt.normalization[k], np.float32) for k in ("mean", "std"))
    x = (images / 255.0 - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)
    with paddle.no_grad():
        return model(paddle.to_tensor(x.astype(np.float32))).numpy()


@pytest.mark.parametrize("fold", [False, True])
def test_exported_model_gives_the_swa_logits_in_paddle_inference_and_jit_load(checkpoint, tmp_path, fold):
    export = script("export")
    prefix = str(tmp_path / "digits")
    result = run_main(export.main, "--model_path", checkpoint, "--out", prefix, *(["--fold_bn"] if fold else []))
    assert result.returncode == 0, result.stderr
    assert f"{prefix}.json, {prefix}.pdiparams" in result.stdout
    assert ("3 BatchNorm layers folded" in result.stdout) == fold
    scaled = data.load_dataset("digits").test.images[:50].astype(np.float32).transpose(0, 3, 1, 2)
    expected = _swa_logits(checkpoint, scaled)
    with np.load(data.DIGITS_FILE) as f:  # the exported program takes the file's raw pixels, 0..16
        raw = f["test_images"][:50, None].astype(np.float32)
    np.testing.assert_allclose(export.predictor_logits(prefix, raw), expected, rtol=1e-4, atol=1e-4)
    loaded = paddle.jit.load(prefix)
    loaded.eval()
    np.testing.assert_allclose(loaded(paddle.to_tensor(raw)).numpy(), expected, rtol=1e-4, atol=1e-4)
    one_line_error(run_main(export.main, "--model_path", checkpoint, "--out", prefix), "--overwrite")


def _eval_scores(*args):
    out = run_main(evaluation.main, *args).stdout
    match = re.search(r": accuracy ([\d.]+)%  NLL ([\d.]+)", out)
    return float(match[1]), float(match[2])


def test_flatness_starts_at_evals_values_and_its_line_passes_both_checkpoints(checkpoint, tmp_path):
    result = run_main(script("flatness").main, "--model_path", checkpoint, "--out", tmp_path / "f",
                      "--directions", "1", "--points", "3")
    assert result.returncode == 0, result.stderr
    assert "BatchNorm recomputed at each point on all training batches of 128" in result.stdout
    with open(tmp_path / "f" / "flatness.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 + 7
    assert (tmp_path / "f" / "flatness.png").stat().st_size > 20_000

    def at(kind, start, t):
        return next(r for r in rows if r["kind"] == kind and r["start"] == start
                    and abs(float(r["t"]) - t) < 1e-9)

    swa = _eval_scores("--model_path", checkpoint, "--bn_update")
    sgd = _eval_scores("--model_path", checkpoint, "--sgd", "--bn_update")
    for row, (accuracy, nll) in ((at("ray", "SWA", 0.0), swa), (at("line", "SGD", 1.0), swa),
                                 (at("line", "SGD", 0.0), sgd), (at("ray", "SGD", 0.0), sgd)):
        assert float(row["test_error"]) == pytest.approx(100.0 - accuracy, abs=1e-3)
        assert float(row["test_loss"]) == pytest.approx(nll, abs=1e-4)
    far = [float(r["train_loss"]) for r in rows if r["kind"] == "ray" and r["start"] == "SWA"]
    assert far[-1] > far[0]  # the loss rises away from the average


def test_the_docs_inference_snippet_runs_quietly_and_scores_as_eval(checkpoint, tmp_path):
    import os
    import subprocess
    import sys

    from helpers import ROOT

    doc = open(os.path.join(ROOT, "docs", "export.md")).read()
    snippet = "# Paddle Inference" + doc.split("```python\n# Paddle Inference")[1].split("```")[0]
    export = run_main(script("export").main, "--model_path", checkpoint, "--out",
                      tmp_path / "exported" / "digits")
    assert export.returncode == 0, export.stderr
    os.symlink(os.path.join(ROOT, "data"), tmp_path / "data")
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines[:5]  # quiet: the answer only
    accuracy = float(re.search(r"accuracy ([\d.]+)%", lines[0])[1])
    assert accuracy == pytest.approx(_eval_scores("--model_path", checkpoint)[0], abs=1e-4)
