"""Run every command README.md and docs/*.md show, in a fresh clone of this repository.

README.md first, then docs/*.md alphabetically, each in document order, so later commands
use what earlier ones wrote. Commands with placeholders (`...`, `<X>`, `[--flag]`, `|`) are
templates and are listed, not run. `pip install` runs with `--dry-run` (nothing is
installed). Training runs (train.py, the launch scripts) get --budget seconds; one still
running then, having printed an epoch row, is stopped with Ctrl-C (SIGINT to its process
group) as a user would, and must print the command to continue. Other commands get
--script_budget seconds, enough for the documented comparisons and the benchmark to finish.
Without --cifar_dir, CIFAR runs read small stand-in files in the official format.

    python scripts/run_documented_commands.py [--budget 120] [--work DIR]
"""
import glob
import io
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from harness import cli, errors  # noqa: E402  (standard library only: no Paddle start-up)

PLACEHOLDER = re.compile(r"\.\.\.|<[^>]*>|\[--|\|")
ROW = re.compile(r"^\s*\d+\s+-?\d*\.?\d+(e[-+]?\d+)?\s")  # an epoch row of train.py's table
TRAINING = re.compile(r"(^|\s)(train\.py|scripts/launch_\w+\.sh|-m paddle\.distributed\.launch)(\s|$)")
SELF = "scripts/run_documented_commands.py"
CHECKPOINT = re.compile(r"checkpoint-(\d+)(?:-step(\d+))?\.pdparams$")


def build_parser():
    p = cli.ArgumentParser(prog="run_documented_commands.py", description=__doc__.split("\n\n")[0])
    seconds = cli.number(float, 0, low_open=True)
    p.add_argument("--budget", type=seconds, default=120,
                   help="seconds a training run may take before it is stopped with SIGINT (default: 120)")
    p.add_argument("--script_budget", type=seconds, default=900,
                   help="seconds any other command may take before it counts as failed (default: 900)")
    p.add_argument("--work", default=None,
                   help="clone into this new folder and keep it (default: a temporary folder, removed)")
    p.add_argument("--cifar_dir", default=None,
                   help="folder holding the official cifar-10-python.tar.gz and "
                        "cifar-100-python.tar.gz (default: none: small stand-in files are written)")
    p.add_argument("--list", action="store_true",
                   help="only list the commands found, run nothing (default: off)")
    return p


# --- extraction -------------------------------------------------------------------------

def documented_commands(root=ROOT):
    """(file, line number, command) for every command of README.md and docs/*.md, in the
    order they are run: README.md, then docs/*.md alphabetically, each in document order."""
    paths = [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))
    found = []
    for path in paths:
        with open(path) as f:
            text = f.read()
        name = os.path.relpath(path, root)
        found += [(name, n, c) for n, c in sorted(_block_commands(text) + _inline_commands(text))]
    return found


def _block_commands(text):
    """(line, command) of each ```bash block line: continuations joined, a leading `!`
    (AI Studio's shell escape) and comments dropped."""
    found = []
    for match in re.finditer(r"```bash\n(.*?)```", text, re.S):
        first = text.count("\n", 0, match.start(1)) + 1
        pending, start = "", None
        for offset, line in enumerate(match[1].splitlines()):
            start = first + offset if start is None else start
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            command = re.split(r"(?:^|\s)#", pending + line)[0].strip().lstrip("!").strip()
            if command:
                found.append((start, " ".join(command.split())))
            pending, start = "", None
    return found


def _inline_commands(text):
    """(line, command) of each inline `python ...` or `scripts/<name>.sh ARGS` span outside
    fenced blocks (kept blank so line numbers hold)."""
    bare = re.sub(r"```.*?```", lambda m: re.sub(r"[^\n]", " ", m[0]), text, flags=re.S)
    found = []
    for match in re.finditer(r"`((?:python|scripts/\w+\.sh) [^`]+)`", bare):
        found.append((bare.count("\n", 0, match.start()) + 1, " ".join(match[1].split())))
    return found


def is_template(command):
    return bool(PLACEHOLDER.search(command))


def not_run(command):
    """Why a documented command is only listed ('template', 'this runner'), or None."""
    if is_template(command):
        return "template"
    return "this runner" if SELF in command else None  # running itself would recurse


# --- stand-in data ----------------------------------------------------------------------

def write_cifar_stand_ins(folder, seed=0):
    """Tiny CIFAR-10 and CIFAR-100 archives in the official python-pickle layout: 30 and 32
    random training images, 16 test images, so a zoo model's epoch is one short step."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def batch(count, classes, **extra):
        labels = rng.integers(0, classes, count).tolist()
        return {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8), **extra,
                **({b"labels": labels} if classes == 10 else {b"fine_labels": labels,
                                                               b"coarse_labels": [c // 5 for c in labels]})}

    ten = {f"data_batch_{i}": batch(6, 10) for i in range(1, 6)}
    ten["test_batch"] = batch(16, 10)
    write_tar(os.path.join(folder, "cifar-10-python.tar.gz"), "cifar-10-batches-py", ten)
    hundred = {"train": batch(32, 100), "test": batch(16, 100)}
    write_tar(os.path.join(folder, "cifar-100-python.tar.gz"), "cifar-100-python", hundred)


def write_tar(archive, inner, batches):
    """The gzipped tarball `archive` holding each batch pickled (protocol 2, as the official
    files) as `inner`/name (the tests' CIFAR files are written with it too)."""
    os.makedirs(os.path.dirname(archive), exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for name, content in batches.items():
            raw = pickle.dumps(content, protocol=2)
            info = tarfile.TarInfo(f"{inner}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def newest_checkpoint(folder):
    """The checkpoint of `folder` furthest into training (epoch, then step), or None."""
    found = []
    for path in glob.glob(os.path.join(folder, "checkpoint-*.pdparams")):
        match = CHECKPOINT.search(os.path.basename(path))
        if match:
            found.append((int(match[1]), int(match[2] or 0), path))
    return max(found)[2] if found else None


def make_stand_ins(part, cwd, stopped_dirs):
    """Copy, for each missing `DIR/checkpoint-N.pdparams` the command reads, DIR's newest
    checkpoint when DIR is a run stopped at the budget (it would have written the file at its
    end); returns notes saying so."""
    notes = []
    for word in shlex.split(part):
        path = os.path.join(cwd, word)
        folder = os.path.normpath(os.path.dirname(word))
        if CHECKPOINT.search(word) and not os.path.exists(path) and folder in stopped_dirs:
            source = newest_checkpoint(os.path.join(cwd, folder))
            if source:
                shutil.copyfile(source, path)
                notes.append(f"stand-in {word} = copy of {os.path.basename(source)}")
    return notes


# --- running ----------------------------------------------------------------------------

class Outcome:
    """How one command ended: status ('ok', 'stopped at budget', 'FAILED'), seconds, output."""

    def __init__(self, status, seconds, output, note=""):
        self.status, self.seconds, self.output, self.note = status, seconds, output, note


def run_command(command, cwd, env, budget, training, grace=180):
    """Run `command` with bash in its own process group. A training run still going at
    `budget` that has printed an epoch row gets SIGINT and must print 'continue with:'."""
    start = time.monotonic()
    process = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        process.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        return _at_budget(process, reader, lines, start, training, grace)
    reader.join()
    status = "ok" if process.returncode == 0 else "FAILED"
    note = "" if status == "ok" else f"exit {process.returncode}"
    return Outcome(status, time.monotonic() - start, "".join(lines), note)


def _at_budget(process, reader, lines, start, training, grace):
    rows = sum(1 for line in list(lines) if ROW.match(line))
    if not (training and rows):
        _kill(process)
        reader.join()
        why = "no epoch row printed" if training else "still running"
        return Outcome("FAILED", time.monotonic() - start, "".join(lines), f"{why} at the budget")
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C, as a user at the terminal
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _kill(process)
    reader.join()
    output = "".join(lines)
    rows = sum(1 for line in output.splitlines() if ROW.match(line))
    if "continue with:" in output:
        return Outcome("stopped at budget", time.monotonic() - start, output,
                       f"ran {rows} epochs, resume command printed")
    return Outcome("FAILED", time.monotonic() - start, output,
                   f"stopped at the budget without printing 'continue with:' (exit {process.returncode})")


def _kill(process):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def has_gpu():
    probe = "import paddle; print(paddle.device.cuda.device_count())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return out.stdout.strip() not in ("", "0")


class Runner:
    """Runs the commands in one clone, remembering which run directories were stopped."""

    def __init__(self, clone, budget, script_budget, gpu):
        self.clone, self.budget, self.script_budget, self.gpu = clone, budget, script_budget, gpu
        self.stopped_dirs = set()
        bin_dir = os.path.dirname(sys.executable)
        self.env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))

    def run(self, command):
        """(status, seconds, note, output) of one documented command, its `&&` parts in turn."""
        seconds, notes, statuses, output = 0.0, [], [], ""
        for part in command.split(" && "):
            part, note = self.prepare(part)
            notes += [note] if note else []
            if note.startswith("needs a GPU"):
                statuses.append("needs a GPU, not run")
                continue
            notes += make_stand_ins(part, self.clone, self.stopped_dirs)
            training = bool(TRAINING.search(part))
            outcome = run_command(part, self.clone, self.env,
                                  self.budget if training else self.script_budget, training)
            seconds += outcome.seconds
            output = outcome.output
            notes += [outcome.note] if outcome.note else []
            statuses.append(outcome.status)
            if outcome.status == "stopped at budget":
                self.stopped_dirs.add(_run_dir(part))
            if outcome.status != "ok":
                break
        return _overall(statuses, notes), seconds, "; ".join(notes), output

    def prepare(self, part):
        """The part as run (pip dry-run, `python` as this interpreter) and a note on it."""
        words = part.split()
        if words[0] == "pip" and words[1:2] == ["install"]:
            return f"{shlex.quote(sys.executable)} -m pip install --dry-run {' '.join(words[2:])}", \
                "pip with --dry-run: nothing installed"
        if "--amp" in words and not self.gpu:
            return part, "needs a GPU (--amp is refused on a CPU)"
        if words[0] == "python":
            return f"{shlex.quote(sys.executable)} {' '.join(words[1:])}", ""
        return part, ""


def _run_dir(part):
    words = shlex.split(part)
    return os.path.normpath(words[words.index("--dir") + 1]) if "--dir" in words else "out"


def _overall(statuses, notes):
    if "FAILED" in statuses:
        return "FAILED"
    if "needs a GPU, not run" in statuses:
        return "needs a GPU, not run"
    if "stopped at budget" in statuses:
        return "stopped at budget"
    return "stand-in used" if any(n.startswith("stand-in") for n in notes) else "ok"


# --- main -------------------------------------------------------------------------------

def clone_into(folder):
    subprocess.run(["git", "clone", "--quiet", ROOT, folder], check=True)


def prepare_data(clone, cifar_dir):
    """Put CIFAR into the clone's data/; returns the line saying which files are used."""
    data = os.path.join(clone, "data")
    if cifar_dir:
        for name in ("cifar-10-python.tar.gz", "cifar-100-python.tar.gz"):
            shutil.copyfile(os.path.join(cifar_dir, name), os.path.join(data, name))
        return f"CIFAR runs use the official files of {cifar_dir}"
    write_cifar_stand_ins(data)
    return ("CIFAR runs use stand-in files (30-32 random training images, 16 test images, "
            "written to the clone's data/), not the official CIFAR-10/100")


def main(argv=None):
    return cli.main("run_documented_commands.py", _main, argv)


def _main(argv):
    args = build_parser().parse_args(argv)
    commands = documented_commands()
    if args.list:
        for name, line, command in commands:
            print(f"{not_run(command) or 'command'}  {name}:{line}  {command}")
        return 0
    if args.cifar_dir and not os.path.isdir(args.cifar_dir):
        raise errors.UsageError(f"--cifar_dir {args.cifar_dir} is not a folder")
    if args.work and os.path.exists(args.work) and os.listdir(args.work):
        raise errors.UsageError(f"--work {args.work} exists and is not empty")
    folder = args.work or tempfile.mkdtemp(prefix="docs-run-")
    try:
        return _run_all(commands, folder, args)
    finally:
        if not args.work:
            shutil.rmtree(folder, ignore_errors=True)


def _run_all(commands, clone, args):
    clone_into(clone)
    print(prepare_data(clone, args.cifar_dir) + f"; clone: {clone}", flush=True)
    runner = Runner(clone, args.budget, args.script_budget, has_gpu())
    counts, start = {}, time.monotonic()
    for name, line, command in commands:
        skipped = not_run(command)
        if skipped:
            status, seconds, note, output = f"{skipped}, not run", 0.0, "", ""
        else:
            status, seconds, note, output = runner.run(command)
        counts[status] = counts.get(status, 0) + 1
        print(f"{status:<20} {seconds:7.1f}s  {name}:{line}  {command}" + (f"  [{note}]" if note else ""),
              flush=True)
        if status == "FAILED":
            print("    " + "\n    ".join(output.splitlines()[-15:]), flush=True)
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"{len(commands)} commands in {time.monotonic() - start:.0f} s: {summary}", flush=True)
    return 1 if counts.get("FAILED") else 0


if __name__ == "__main__":
    sys.exit(main())
