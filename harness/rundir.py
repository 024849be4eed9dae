"""A run directory holds one run: a record of what defines it, one writer at a time.

    DIR/run.json   the run's id and the flags that define it (written when the run starts)
    DIR/.lock      held by the process writing DIR (an advisory lock the system drops when the
                   process ends, however it ends, so a killed run never leaves it stale)

`plan_start` decides, before anything is written, how train.py starts in --dir: afresh,
or resuming which checkpoint, and what of the run it may discard; `record_run` then writes
the record.
"""
import dataclasses
import errno
import fcntl
import fnmatch
import json
import os
import re
import shlex
import shutil
import stat
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from harness import checkpoints, errors, files

RECORD = "run.json"
LOCK = ".lock"
# What a run writes into its directory; the lock file is not part of a run.
RUN_FILES = ["checkpoint-*.pdparams", "fge-*.pdparams", "metrics.csv", "command.sh", "args.json", RECORD, "vdl",
             "convergence.png"]


def acquire_lock(directory):
    """Take DIR/.lock for this process, or raise UsageError naming the process that holds it.

    Returns the open lock file: the lock lasts as long as it stays open (keep a reference).
    """
    path = os.path.join(directory, LOCK)
    try:  # never through a link: a .lock pointing at a user's file must not truncate it
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EACCES, errno.EPERM):
            raise errors.UsageError(f"{path} is not a lock file this code made (a link, a folder "
                                    "or unwritable); remove it if no run uses --dir, or choose "
                                    "another --dir") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise errors.UsageError(f"{path} is not a regular file; remove it if no run uses --dir, "
                                "or choose another --dir")
    handle = os.fdopen(fd, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        raise errors.UsageError(f"--dir {directory} is being written by another process (PID "
                                f"{holder}); wait for it to end, stop it, or choose another --dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def is_run_file(name):
    """Whether `name` (a file name) is one a run writes into its directory: exactly the names
    of RUN_FILES, checkpoints only as train.py names them (a user's checkpoint-best.pdparams
    or checkpoint-010.pdparams is not one)."""
    if name.startswith("checkpoint-"):
        return checkpoints.parse_checkpoint_name(name) is not None
    if name.startswith("fge-"):
        return re.fullmatch(r"fge-(0|[1-9]\d*)\.pdparams", name) is not None
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_FILES)


def previous_run_files(directory):
    """Paths of a run's files in `directory` (empty if it holds none), with the offline
    averages written into it (`record_average`)."""
    averages = set((files.read_json_dict(os.path.join(directory, RECORD)) or {}).get("averages", []))
    return sorted(os.path.join(directory, name) for name in os.listdir(directory)
                  if is_run_file(name) or name in averages)


def record_average(directory, name):
    """Note in the run record that `name`, an offline average of the run's checkpoints, was
    written into the run directory: it belongs to the run (and goes with it on --overwrite).
    The caller holds the directory's lock."""
    path = os.path.join(directory, RECORD)
    record = files.read_json_dict(path)
    if record is not None:
        record["averages"] = sorted(set(record.get("averages", [])) | {name})
        files.write_json(path, record)


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
        raise errors.UsageError(f"{os.path.join(directory, RECORD)} is unreadable ({e}); restore it "
                                "or start a new run in another --dir") from None


def read_args(directory):
    """The arguments recorded in DIR/args.json, or None if there are none."""
    return files.read_json_dict(os.path.join(directory, "args.json"))


# --------------------------------------------------------------------------- starting a run

@dataclass
class Plan:
    """How this run starts, decided on rank 0 and shared with every rank."""
    resume: str | None = None         # checkpoint to resume from
    run_id: str = ""
    discard: list = dataclasses.field(default_factory=list)   # files of the run to delete
    finished: str = ""                # the run is already done: say so and stop
    created_dir: bool = False


@dataclass(frozen=True)
class Request:
    """What train.py's command asks of its run directory."""
    dir: str                  # --dir
    resume: str | None        # --resume: a checkpoint, "auto", or None
    overwrite: bool           # --overwrite
    epochs: int               # --epochs: the run's length
    world_size: int           # processes of this launch
    same_run: Callable        # recorded flags -> ["--flag (run: X, now: Y)", ...] that differ


@dataclass
class Opened:
    """A run directory checked and locked for a run by `plan_start`."""
    directory: str
    plan: Plan
    lock: object                      # held until the run ends (close it)
    checkpoint: object = None         # the checkpoint to resume from, as read (read once)


def plan_start(args):
    """Check --dir and --resume for train.py's `args` (a Request); returns what it Opened.
    Nothing in --dir changes but its lock (a --dir that did not exist is created for it, and
    removed again if a check fails)."""
    existing = os.path.abspath(args.dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        problem = "not a folder" if not os.path.isdir(existing) else "not writable"
        raise errors.UsageError(f"cannot write to --dir {args.dir} ({existing} is {problem}); "
                                "choose another --dir")
    created = not os.path.isdir(args.dir)
    try:
        os.makedirs(args.dir, exist_ok=True)
    except OSError as e:
        raise errors.UsageError(f"cannot make --dir {args.dir}: {os.strerror(e.errno)}; choose "
                                "another --dir") from None
    try:
        lock = acquire_lock(args.dir)
        try:
            check_writable(args.dir)
            plan, ckpt = _plan(args)
        except BaseException:
            lock.close()
            raise
    except BaseException:
        if created:
            remove_created_dir(args.dir)
        raise
    plan.created_dir = created
    return Opened(args.dir, plan, lock, ckpt)


def check_writable(directory):
    """Refuse a --dir where a run's file could not be written at the end (a folder in a
    file's place, an unwritable file), before anything is trained."""
    for name in ("metrics.csv", "command.sh", "args.json", RECORD, "convergence.png", "vdl"):
        path = os.path.join(directory, name)
        folder = name == "vdl"
        if os.path.lexists(path) and (os.path.isdir(path) != folder or os.path.islink(path)):
            kind = "a file or a link" if folder else "a folder or a link"
            raise errors.UsageError(f"{path} is {kind}, where the run writes its {name}; move it "
                                    "away or choose another --dir")
        if os.path.exists(path) and not os.access(path, os.W_OK | (os.X_OK if folder else 0)):
            raise errors.UsageError(f"{path} is not writable; make it writable or choose "
                                    "another --dir")


def remove_created_dir(directory):
    """Remove a --dir made by plan_start if only its lock file is in it."""
    lock = os.path.join(directory, LOCK)
    if os.path.exists(lock):
        os.unlink(lock)
    if not os.listdir(directory):
        os.rmdir(directory)


def _plan(args):
    previous = previous_run_files(args.dir)
    record = read_record(args.dir)
    path = args.resume
    if path == "auto":
        found = checkpoints.list_checkpoints(args.dir)
        path = found[max(found)] if found else None
    if path is None:
        if previous and not args.overwrite:
            advice = (" but no checkpoint to resume" if args.resume == "auto"
                      else "; resume it with --resume auto")
            raise errors.UsageError(f"--dir {args.dir} holds a previous run "
                                    f"({os.path.basename(previous[0])}){advice}; choose another "
                                    "--dir, or pass --overwrite to replace it")
        return Plan(run_id=new_run_id(), discard=previous), None
    return _plan_resume(args, path, previous, record)


def _plan_resume(args, path, previous, record):
    """(The plan for resuming from checkpoint `path`, the checkpoint), once it fits the run."""
    ckpt = checkpoints.load_checkpoint(path)
    if ckpt.fge_snapshot:
        raise errors.UsageError(f"--resume {path} is an FGE snapshot, not a training checkpoint; "
                                "resume from one of the run's checkpoint-*.pdparams")
    if ckpt.averaged_from:
        raise errors.UsageError(f"--resume {path} is an offline average of checkpoints "
                                "(average_checkpoints.py), not a training checkpoint; resume from "
                                "one of the run's checkpoint-*.pdparams, or start from its "
                                "weights with --init")
    saved = ckpt.args
    if not isinstance(saved, dict):
        raise errors.UsageError(f"--resume {path} does not record the flags it was trained with, "
                                "so it cannot be resumed; start from its weights with --init")
    run_id = ckpt.run_id or (record or {}).get("run_id") or new_run_id()
    theirs = record.get("run_id") if record else None
    if theirs and ckpt.run_id and theirs != ckpt.run_id:
        raise errors.UsageError(f"--resume {path} is a checkpoint of another run than the one in "
                                f"--dir {args.dir}; resume it in its own --dir (or an empty one)")
    old = read_args(args.dir) if previous and record is None else None
    for flags in filter(None, (old, saved)):  # a run of an older version has only args.json
        check_same_run(path, args.same_run(flags))
    epoch, step = ckpt.epoch, ckpt.step
    if epoch > args.epochs or (epoch == args.epochs and step):
        raise errors.UsageError(f"--epochs {args.epochs} is below the checkpoint's "
                                f"{checkpoints.describe_position(epoch, step)}; raise --epochs")
    world = args.world_size
    if step and (ckpt.world_size or 1) != world:
        raise errors.UsageError(f"--resume {path} was saved mid-epoch by {ckpt.world_size or 1} "
                                f"processes; resume it with the same number (now {world}), or from an "
                                "epoch's checkpoint")
    if epoch == args.epochs:
        return Plan(finished=f"the run in {args.dir} is finished ({epoch} of {args.epochs} "
                             "epochs); nothing to do (raise --epochs to train on)"), None
    later = [p for position, p in checkpoints.list_checkpoints(args.dir).items()
             if position > (epoch, step) and os.path.abspath(p) != os.path.abspath(path)]
    if later and not args.overwrite:
        raise errors.UsageError(f"--dir {args.dir} has checkpoints after {os.path.basename(path)} "
                                f"({', '.join(sorted(os.path.basename(p) for p in later))}); pass "
                                "--overwrite to resume from it and discard them, or resume the newest")
    return Plan(resume=path, run_id=run_id, discard=later), ckpt


def check_same_run(path, changed):
    """Refuse a resume whose flags differ from the run's where they define it (`changed`)."""
    if changed:
        commands = os.path.join(os.path.dirname(os.path.abspath(path)), "command.sh")
        see = f" (see {commands})" if os.path.isfile(commands) else ""
        raise errors.UsageError(f"--resume {path}: the command differs from the run's flags in "
                                f"{'; '.join(changed)}; resume with the run's command{see} or "
                                "start a new run in another --dir")


def record_run(directory, plan, world_size, command, flags, identity):
    """Write the run's record (its id, and of `flags` by name those in `identity`), command
    line and flags into `directory`; clear what the plan discards."""
    remove(plan.discard)
    # Temporary files of writes that were killed (never complete files); a user's own *.tmp
    # files are not ours and stay.
    remove(files.leftover_temporaries(directory, is_run_file))
    files.write_json(os.path.join(directory, RECORD),
               {"run_id": plan.run_id, "identity": {name: flags[name] for name in identity},
                "world_size": world_size})
    command = " ".join(shlex.quote(a) for a in [sys.executable] + command)
    with open(os.path.join(directory, "command.sh"), "a" if plan.resume else "w") as f:
        f.write(("# resumed from " + plan.resume + "\n" if plan.resume else "") + command + "\n")
    files.write_json(os.path.join(directory, "args.json"), flags)
