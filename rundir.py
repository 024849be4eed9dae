"""A run directory holds one run: a record of what defines it, one writer at a time.

    DIR/run.json   the run's id and the flags that define it (written when the run starts)
    DIR/.lock      held by the process writing DIR (an advisory lock the system drops when the
                   process ends, however it ends, so a killed run never leaves it stale)

Only the standard library is used.
"""
import errno
import fcntl
import glob
import json
import os
import shutil
import uuid

import cli

RECORD = "run.json"
LOCK = ".lock"
# What a run writes into its directory; the lock file is not part of a run.
RUN_FILES = ["checkpoint-*.pdparams", "metrics.csv", "command.sh", "args.json", RECORD, "vdl",
             "convergence.png"]


def acquire_lock(directory):
    """Take DIR/.lock for this process, or raise UsageError naming the process that holds it.

    Returns the open lock file: the lock lasts as long as it stays open (keep a reference).
    """
    path = os.path.join(directory, LOCK)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        raise cli.UsageError(f"--dir {directory} is being written by another process (PID "
                             f"{holder}); wait for it to end, stop it, or choose another --dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def previous_run_files(directory):
    """Paths of a run's files in `directory` (empty if it holds none)."""
    pattern = glob.escape(directory)
    return sorted(p for name in RUN_FILES for p in glob.glob(os.path.join(pattern, name)))


def remove(paths):
    for path in paths:
        shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)


def new_run_id():
    return uuid.uuid4().hex


def read_record(directory):
    """The run record of `directory` ({'run_id': ..., 'args': {...}}), or None."""
    try:
        with open(os.path.join(directory, RECORD)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise cli.UsageError(f"{os.path.join(directory, RECORD)} is unreadable ({e}); restore it "
                             "or start a new run in another --dir") from None


def read_args(directory):
    """The arguments recorded in DIR/args.json, or None if there are none."""
    try:
        with open(os.path.join(directory, "args.json")) as f:
            args = json.load(f)
    except (OSError, ValueError):
        return None
    return args if isinstance(args, dict) else None


def write_json(path, obj):
    """Write `obj` as JSON through a temporary file renamed into place."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if e.filename is None:
            e.filename = path
        raise


def show(value):
    """A flag value as a user typed it: on/off for switches."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


def differences(recorded, current, names):
    """`--flag (run: X, now: Y)` for each of `names` whose value differs."""
    return [f"--{name} (run: {show(recorded.get(name))}, now: {show(current.get(name))})"
            for name in names if recorded.get(name) != current.get(name)]
