"""What every entry point shares: one-line errors and exit codes, number checks, common flags.

train.py, eval.py and the scripts build their parsers with `ArgumentParser` and run through
`main`, so a bad flag, file or environment is reported the same way everywhere: one line on
stderr and the exit code of `errors` (0 done, 1 the run failed, 2 bad input).

Only the standard library is imported here, so scripts that do not need Paddle start fast.
"""
import argparse
import contextlib
import errno
import math
import os
import signal
import sys

from harness import errors


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (the problem and where to look), exit code 2."""

    def error(self, message):
        self.exit(errors.EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


# --------------------------------------------------------------------------- numbers

def number(kind, minimum=None, maximum=None, low_open=False, high_open=False):
    """An argparse type: a finite `kind` (int or float) within the bounds given.

    Example:
        >>> number(float, 0, 1, high_open=True)("0.9")   # 0 <= x < 1
        0.9
    """
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole' if kind is int else 'a'} number, "
                                             f"got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
        if minimum is not None and (value < minimum or (low_open and value == minimum)):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {minimum}, got {text}")
        if maximum is not None and (value > maximum or (high_open and value == maximum)):
            raise argparse.ArgumentTypeError(f"must be {'<' if high_open else '<='} {maximum}, got {text}")
        return value
    return parse


POSITIVE_INT = number(int, 0, low_open=True)
NON_NEGATIVE_INT = number(int, 0)
POSITIVE_FLOAT = number(float, 0, low_open=True)
NON_NEGATIVE_FLOAT = number(float, 0)
SEED = number(int, 0, 2**32 - 1)


def path_argument(text):
    """A non-empty path."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


# --------------------------------------------------------------------------- common flags

def add_hardware_flags(parser):
    """--device and --threads, as train.py, eval.py and the scripts take them."""
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                        help="auto uses the GPU when Paddle has one (default: auto)")
    parser.add_argument("--threads", type=number(int, 0, 1024), default=0, metavar="N",
                        help="CPU threads per process; 0 chooses from the model and the cores "
                             "(default: 0)")


def add_checkpoint_overrides(parser, source):
    """Flags that override what a checkpoint says about its model, data and batch size."""
    parser.add_argument("--dataset", help=f"dataset (default: {source})")
    parser.add_argument("--data_path", metavar="PATH", type=path_argument,
                        help=f"dataset folder (default: {source})")
    parser.add_argument("--model", help=f"model name (default: {source})")
    parser.add_argument("--batch_size", type=POSITIVE_INT, metavar="N",
                        help=f"batch size (default: {source}, else 128)")
    add_hardware_flags(parser)


def check_output(path, flag, overwrite=False, suffixes=None, what="file", make_folder=True):
    """Refuse, before any work is done, an output that cannot or must not be written: a
    folder where a file goes, a name without a file part, a suffix no writer takes, an
    existing file without `overwrite`, a folder that cannot be made or written. Makes the
    output's folder if it is missing (as train.py makes --dir) unless `make_folder` is False,
    when a missing folder is refused. Returns `path`."""
    if not os.path.basename(path):
        raise errors.UsageError(f"{flag} {path} names a folder; give a {what} name in it, e.g. "
                                f"{os.path.join(path, 'model')}")
    if os.path.isdir(path):
        raise errors.UsageError(f"{flag} {path} is a folder; give a {what} name")
    suffix = os.path.splitext(path)[1].lower()
    if suffixes and suffix not in suffixes:
        raise errors.UsageError(f"{flag} {path}: the {what} must end in one of "
                                f"{', '.join(suffixes)}")
    if os.path.lexists(path) and not overwrite:
        raise errors.UsageError(f"{flag} {path} exists; choose another name or pass --overwrite")
    folder = os.path.dirname(os.path.abspath(path))
    if not make_folder and not os.path.isdir(folder):
        raise errors.UsageError(f"{flag} {path}: the folder {folder} does not exist or is not "
                                f"writable; create it or choose another {flag}")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise errors.UsageError(f"{flag} {path}: cannot make the folder {folder} "
                                f"({os.strerror(e.errno)}); choose another {flag}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise errors.UsageError(f"{flag} {path}: the folder {folder} does not exist or is not "
                                f"writable; choose another {flag}")
    return path


# --------------------------------------------------------------------------- running

@contextlib.contextmanager
def tolerate_closed_stdout():
    """While inside, a closed stdout (`train.py ... | head -3`) is harmless: output is dropped,
    the work goes on.

    Python ignores SIGPIPE, so a write to a closed pipe raises BrokenPipeError; from then on
    stdout is pointed at /dev/null.
    """
    original = sys.stdout
    sys.stdout = _SafeStream(original)
    try:
        yield
    finally:
        sys.stdout = original


class _SafeStream:
    def __init__(self, stream):
        self._stream, self._broken = stream, False

    def _guard(self, method, *args):
        if self._broken:
            return None
        try:
            return getattr(self._stream, method)(*args)
        except BrokenPipeError:
            self._broken = True
            try:  # the interpreter flushes stdout at exit: give it somewhere to go
                os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
            except (OSError, ValueError):
                pass
            return None

    def write(self, text):
        return self._guard("write", text)

    def flush(self):
        return self._guard("flush")

    def __getattr__(self, name):
        return getattr(self._stream, name)


def disk_error_message(error):
    """A one-line description of an OSError from writing, or None if it is not a disk problem."""
    if error.errno == errno.ENOSPC:
        return f"no space left on the device writing {error.filename or 'a file'}"
    if error.errno == errno.EFBIG:
        return f"file size limit reached writing {error.filename or 'a file'} (ulimit -f)"
    if error.errno == errno.EDQUOT:
        return f"disk quota exceeded writing {error.filename or 'a file'}"
    return None


def main(prog, body, argv=None):
    """Run `body(argv)` and turn its failures into one line on stderr and an exit code.

    Args:
        prog: the script's name, first on every error line.
        body: callable(argv) returning the exit code.
        argv: the arguments (None: sys.argv[1:]).

    Returns:
        The exit code: body's, 1 for RunFailed and disk errors, 2 for UsageError.
    """
    # Without this a file-size limit kills the process (SIGXFSZ) instead of raising EFBIG.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        return body(argv)
    except errors.UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return errors.EXIT_USAGE
    except errors.RunFailed as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return errors.EXIT_FAILED
    except OSError as e:
        message = disk_error_message(e)
        if message is None:
            raise
        print(f"{prog}: error: {message}; files written before are intact; "
              "free some space and run again", file=sys.stderr)
        return errors.EXIT_FAILED
