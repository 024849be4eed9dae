"""Writing a file so that a crash, a kill or a full disk never leaves it half-written, and
reading back the JSON records written so.

    >>> atomic_write("runs/a/run.json", lambda tmp: write_json_to(tmp))
"""
import json
import os
import re
import uuid

# Temporary names are "<final name>.<pid>.<8 hex digits>.tmp": unique per writer, and
# recognisable, so that a crashed writer's leftovers (and only those) can be cleared.
_TEMPORARY = re.compile(r"\.\d+\.[0-9a-f]{8}\.tmp$")


def temporary_name(path):
    """A fresh temporary path beside `path`, created empty (the umask's mode, not 0600)."""
    tmp = f"{os.path.abspath(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    return tmp


def atomic_write(path, write):
    """Call `write(tmp)` to fill a temporary file beside `path`, flush it to disk and rename it
    to `path`: `path` is then absent, its old content, or complete (also when the disk fills
    up: the temporary file is removed and the OSError raised, naming `path`). Returns `path`."""
    tmp = temporary_name(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = path
        raise
    return path


def leftover_temporaries(directory, names):
    """Temporary files of `atomic_write` for files named in `names` (a predicate on the final
    name) that a killed writer left in `directory`."""
    found = []
    for entry in os.listdir(directory):
        match = _TEMPORARY.search(entry)
        if match and names(entry[:match.start()]):
            found.append(os.path.join(directory, entry))
    return found


def write_json(path, obj):
    """Write `obj` as JSON to `path` atomically (see `atomic_write`)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


def read_json_dict(path):
    """The dict in JSON file `path`, or None if it is missing, unreadable or not a dict."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
