"""The harness around the averaging core: what train.py, eval.py and scripts/ are built from.

    errors        the exceptions of bad input and failed runs, and their exit codes
    cli           argument parsing and one-line errors for every entry point
    config        train.py's flags, parsed and checked once into a frozen Config
    runtime       the device, CPU threads and math library
    distributed   the data-parallel job: rank, collectives, failing together
    pickles       reading a pickle as data only (checkpoints, CIFAR batches)
    data          the datasets from their official files, and the batch loader
    checkpoints   the checkpoint: its record, writing, reading and resuming it, rebuilding
                  what it was trained with
    session       one training run's state (Run), built and restored once by setup
    engine        one training pass and one evaluation pass
    scoring       scores (accuracy, NLL, ECE), predictions, SWAG's model average, reliability plots
    schedules     learning rates, averaging and evaluation epochs, step seeds: pure functions
    rundir        a run directory: one run, one writer, its record
    report        the epoch table, metrics.csv, VisualDL, the convergence plot
    files         writing a file atomically

None of it is needed to use utils.py (the averaging core) in your own code; callbacks.py
uses checkpoints (its `.swa` files), schedules, engine and distributed (the refresh).
Importing this package does nothing; entry points call `prepare()` before Paddle loads.
"""
import os
import warnings


def prepare():
    """Settings that must be in place before Paddle is first imported; entry points call this
    first, before `import paddle` (afterwards it is too late for the first one).

    - On AMD CPUs, the MKL bundled with Paddle takes a slow generic path unless
      MKL_DEBUG_CPU_TYPE=5 is in the environment when it loads (2-3x faster convolutions
      measured here; set after `import paddle` it takes effect only sometimes). A value the
      user set is kept; GPUs are unaffected.
    - Paddle warns at import that no compiler cache (ccache) is installed, which matters only
      for building C++ extensions, and at BatchNorm forwards in training mode that statistics
      are tracked: neither tells a user of these scripts anything.
    """
    if "MKL_DEBUG_CPU_TYPE" not in os.environ and _cpu_vendor() == "AuthenticAMD":
        os.environ["MKL_DEBUG_CPU_TYPE"] = "5"
    warnings.filterwarnings("ignore", message="No ccache found")
    warnings.filterwarnings("ignore", message="When training, we now always track")


def _cpu_vendor():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
