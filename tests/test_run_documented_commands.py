"""scripts/run_documented_commands.py: which commands it finds in the docs, how it stops a
training run at its budget, the stand-ins it makes. Nothing here runs a documented command."""
import os
import shlex
import sys

import pytest

from helpers import ROOT, one_line_error, run_main, script

runner = script("run_documented_commands")
PY = shlex.quote(sys.executable)
# Prints a header and one epoch row as train.py does, then trains "forever"; Ctrl-C makes it
# print train.py's stop line, unless the variant ignores SIGINT.
FAKE_RUN = """import signal, sys, time
def stop(*_):
    print("stopped by SIGINT at epoch 2; saved x; continue with: python train.py --resume auto", flush=True)
    sys.exit(130)
signal.signal(signal.SIGINT, {handler})
print("      ep        lr   tr_loss", flush=True)
{rows}
time.sleep(60)
"""


def _fake(rows=1, handler="stop"):
    program = FAKE_RUN.format(handler=handler, rows="\n".join(
        f'print("{i + 1:>8}    0.1000    2.3026", flush=True)' for i in range(rows)))
    return f"{PY} -c {shlex.quote(program)}"


def _write(folder, name, text):
    path = os.path.join(folder, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


# --- extraction -------------------------------------------------------------------------

def test_the_repository_quick_start_command_is_found_first_with_its_line():
    name, line, command = runner.documented_commands(ROOT)[0]
    assert name == "README.md" and command.startswith("pip install paddlepaddle==3.3.1")
    assert "python train.py --dataset digits --model SimpleCNN" in command
    with open(os.path.join(ROOT, "README.md")) as f:
        assert "python train.py --dataset digits" in f.read().splitlines()[line - 1]


def test_the_repository_ai_studio_line_is_found_without_its_exclamation_mark():
    commands = [c for _, _, c in runner.documented_commands(ROOT)]
    assert any(c.startswith("pip install -q -r requirements.txt && python train.py") for c in commands)
    assert not any(c.startswith("!") for c in commands)


def test_the_repository_templates_are_found_and_marked_as_templates():
    found = {c: runner.is_template(c) for _, _, c in runner.documented_commands(ROOT)}
    assert found["python train.py ... --swa --swag"] is True
    assert found["python eval.py --model_path runs/digits/checkpoint-60.pdparams"] is False


def test_extraction_joins_continuations_drops_comments_and_keeps_document_order(tmp_path):
    _write(tmp_path, "README.md", "intro `python a.py --x 1` here\n\n```bash\n# a comment\n"
                                  "python b.py --long \\\n    --flag 2  # why\n!pip install -q z\n```\n"
                                  "```python\nimport x  # `python not.py --really`\n```\n")
    _write(tmp_path, "docs/b.md", "`scripts/run.sh 4 --y`, and `scripts/run.sh` alone is a name\n")
    _write(tmp_path, "docs/a.md", "`python c.py <DIR>` and\n`python d.py\n--wrapped`\n")
    assert runner.documented_commands(str(tmp_path)) == [
        ("README.md", 1, "python a.py --x 1"), ("README.md", 5, "python b.py --long --flag 2"),
        ("README.md", 7, "pip install -q z"), ("docs/a.md", 1, "python c.py <DIR>"),
        ("docs/a.md", 2, "python d.py --wrapped"), ("docs/b.md", 1, "scripts/run.sh 4 --y")]


@pytest.mark.parametrize("command", ["python train.py ... --swa", "python x.py --dir <DIR>",
                                     "python eval.py --model_path m [--sgd]", "train.py | head"])
def test_a_command_with_a_placeholder_is_a_template(command):
    assert runner.is_template(command)


def test_the_runner_named_in_the_docs_is_listed_not_run():
    assert runner.not_run("python scripts/run_documented_commands.py") == "this runner"
    assert runner.not_run("python train.py ... --swa") == "template"
    assert runner.not_run("python scripts/compare.py --seeds 1") is None


def test_a_command_with_only_concrete_words_is_not_a_template():
    assert not runner.is_template("python scripts/compare.py --seeds 1 2 3 --out_dir runs/compare")


# --- budget and stop --------------------------------------------------------------------

def test_a_training_run_at_its_budget_gets_ctrl_c_and_counts_as_stopped(tmp_path):
    outcome = runner.run_command(_fake(rows=2), str(tmp_path), dict(os.environ), 1.5, True)
    assert outcome.status == "stopped at budget", outcome.output
    assert outcome.note == "ran 2 epochs, resume command printed"
    assert outcome.seconds < 30


def test_a_training_run_that_ignores_ctrl_c_is_killed_and_fails(tmp_path):
    outcome = runner.run_command(_fake(handler="signal.SIG_IGN"), str(tmp_path), dict(os.environ),
                                 1.0, True, grace=1.0)
    assert outcome.status == "FAILED" and "without printing 'continue with:'" in outcome.note


def test_a_training_run_without_an_epoch_row_at_its_budget_fails(tmp_path):
    outcome = runner.run_command(_fake(rows=0), str(tmp_path), dict(os.environ), 1.0, True)
    assert outcome.status == "FAILED" and outcome.note == "no epoch row printed at the budget"


def test_a_script_still_running_at_its_budget_fails_even_with_rows(tmp_path):
    outcome = runner.run_command(_fake(rows=1), str(tmp_path), dict(os.environ), 1.0, False)
    assert outcome.status == "FAILED" and outcome.note == "still running at the budget"


def test_a_nonzero_exit_fails_and_a_zero_exit_is_ok(tmp_path):
    failed = runner.run_command(f"{PY} -c 'import sys; sys.exit(3)'", str(tmp_path), dict(os.environ), 30, True)
    ok = runner.run_command(f"{PY} -c 'print(1)'", str(tmp_path), dict(os.environ), 30, True)
    assert (failed.status, failed.note, ok.status) == ("FAILED", "exit 3", "ok")


# --- stand-ins and rewriting ------------------------------------------------------------

def test_a_missing_checkpoint_of_a_stopped_run_is_the_copy_of_its_newest(tmp_path):
    for name in ("checkpoint-0.pdparams", "checkpoint-40.pdparams", "checkpoint-41-step0.pdparams"):
        _write(tmp_path, f"runs/a/{name}", name)
    notes = runner.make_stand_ins("python train.py --init runs/a/checkpoint-160.pdparams",
                                  str(tmp_path), {"runs/a"})
    assert notes == ["stand-in runs/a/checkpoint-160.pdparams = copy of checkpoint-41-step0.pdparams"]
    assert (tmp_path / "runs/a/checkpoint-160.pdparams").read_text() == "checkpoint-41-step0.pdparams"


def test_no_stand_in_for_a_run_that_was_not_stopped(tmp_path):
    _write(tmp_path, "runs/a/checkpoint-40.pdparams", "x")
    assert runner.make_stand_ins("python eval.py --model_path runs/a/checkpoint-60.pdparams",
                                 str(tmp_path), set()) == []
    assert not (tmp_path / "runs/a/checkpoint-60.pdparams").exists()


def test_pip_install_runs_as_a_dry_run_and_amp_needs_a_gpu(tmp_path):
    run = runner.Runner(str(tmp_path), 1, 1, gpu=False)
    part, note = run.prepare("pip install -q -r requirements.txt")
    assert part.endswith("-m pip install --dry-run -q -r requirements.txt") and "--dry-run" in note
    assert run.prepare("scripts/launch_one_machine.sh 8 --amp O1")[1].startswith("needs a GPU")
    assert run.prepare("python eval.py --x")[0] == f"{PY} eval.py --x"


def test_the_cifar_stand_ins_are_read_by_the_dataset_loader(tmp_path):
    from harness import data

    runner.write_cifar_stand_ins(str(tmp_path))
    ten = data.load_dataset("CIFAR10", str(tmp_path), download=False)
    hundred = data.load_dataset("CIFAR100", str(tmp_path), download=False)
    assert (len(ten.train), len(ten.test), len(hundred.train), len(hundred.test)) == (30, 16, 32, 16)


@pytest.mark.parametrize("flags, fragment", [(["--budget", "0"], "--budget"),
                                             (["--cifar_dir", "/no/such/folder"], "--cifar_dir")])
def test_a_bad_flag_is_one_line_and_exit_2(flags, fragment):
    one_line_error(run_main(runner.main, *flags), fragment)


def test_list_prints_every_command_and_runs_nothing():
    result = run_main(runner.main, "--list")
    assert result.returncode == 0
    assert len(result.stdout.splitlines()) == len(runner.documented_commands(ROOT))
