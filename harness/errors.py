"""The exceptions of the harness and the exit codes they stand for (standard library only, so
library code may raise them without importing the command-line layer).

    exit 0   done
    exit 1   RunFailed: the run could not go on (diverged, disk full, another process
             failed); the message says what was kept
    exit 2   UsageError: bad input (a flag, a file, a folder); nothing was changed
"""
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input (a flag, a file, a folder), reported as one line with exit code 2.
    The message names the problem and the fix."""


class DataError(UsageError):
    """Data that cannot be loaded; the message names the files and what to do."""


class CheckpointError(UsageError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


class DeviceError(UsageError):
    """The requested device is not available."""


class RunFailed(Exception):
    """The run could not go on: one line, exit code 1. The message says what was kept."""


class Diverged(RunFailed):
    """The loss became NaN or infinite."""


class OtherRankFailed(RunFailed):
    """Another process of a data-parallel job failed; it reports its own error."""
