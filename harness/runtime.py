"""Where the scripts run: the device, and on a CPU its threads and math library.

Shared by train.py, eval.py and scripts/; none of it is needed to use the SWA core. The
data-parallel job is harness/distributed.py's.
"""
import ctypes
import os

import paddle

from harness import errors

# Threads per model, from runs on a 2-core AMD EPYC VM (train images/s, batch 64, medians of
# 3-5 fresh processes): VGG16 28.9 on one thread vs 36.6 on two, reliably; PreResNet110
# 39.5 vs 28.3; PreResNet164 24.0 vs anywhere from 17.8 to 28.6 (two threads suffer whenever
# the host is busy; one thread does not); SimpleCNN's tiny convolutions lose to OpenMP's
# overhead. The PreResNets get half the cores, SimpleCNN one, other models all of them.
FEWER_THREADS = {"SimpleCNN": "one", "PreResNet110": "half", "PreResNet164": "half"}


# Why, in the start-up line (see FEWER_THREADS for the measurements).
AUTO_REASONS = {"one": "its small convolutions are fastest on one",
                "half": "more threads lose speed whenever the host is busy",
                None: "it gains from every core"}


def auto_threads(model_name, cores):
    """CPU threads for `model_name` on `cores` cores (see FEWER_THREADS); --threads overrides."""
    rule = FEWER_THREADS.get(model_name)
    if rule == "one":
        return 1
    if rule == "half":
        return max(1, cores // 2)
    return cores


def keep_freed_memory():
    """Stop glibc from returning freed tensor memory to the system; True if applied.

    Tensors of a few MB are served by mmap and unmapped when freed, so every new
    activation page-faults its memory in again: Paddle's elementwise ops (add, relu) then
    run ~8x slower on CPU (measured: add of two 16 MB tensors 12 ms -> 1.5 ms). Raising the
    mmap and trim thresholds keeps that memory in the process for reuse.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and
                    libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False  # not glibc


def available_cores():
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def tune_cpu(threads=0, model_name=None, processes_per_machine=1):
    """Set the CPU thread count and memory reuse; returns a description of the settings.

    Paddle pins one thread unless told otherwise; this takes `auto_threads` of the cores
    available to each process, and keeps freed memory for reuse (`keep_freed_memory`).
    (The math-library code path is chosen when this module is imported: see
    `harness.prepare`.)

    Args:
        threads: thread count; 0 picks one as above, unless OMP_NUM_THREADS > 1 was set.
        model_name: the model to be trained (decides the automatic count).
        processes_per_machine: processes sharing this machine's cores.
    """
    why = "--threads"
    if threads <= 0:
        user = os.environ.get("OMP_NUM_THREADS", "1")
        if user.isdigit() and int(user) > 1:
            threads, why = int(user), "OMP_NUM_THREADS"
        else:
            cores = max(1, available_cores() // max(1, processes_per_machine))
            threads = auto_threads(model_name, cores)
            why = (f"chosen for {model_name or 'the model'} on {cores} core{'s' if cores > 1 else ''}: "
                   f"{AUTO_REASONS.get(FEWER_THREADS.get(model_name), AUTO_REASONS[None])}; "
                   "--threads N to change")
    paddle.base.core.set_num_threads(threads)
    keep_freed_memory()
    path = os.environ.get("MKL_DEBUG_CPU_TYPE")
    return f"{threads} CPU thread{'s' if threads > 1 else ''} ({why})" + (
        f", MKL_DEBUG_CPU_TYPE={path}" if path else "")


def has_gpu():
    return paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0




def select_device(choice, gpu_id=0):
    """Set Paddle's device from --device (auto/cpu/gpu) and return "cpu" or "gpu"."""
    if choice == "gpu" and not has_gpu():
        raise errors.DeviceError("--device gpu: this Paddle has no usable GPU (install the "
                                 "paddlepaddle-gpu wheel for your CUDA from Paddle's install guide), "
                                 "or use --device cpu")
    kind = "gpu" if choice == "gpu" or (choice == "auto" and has_gpu()) else "cpu"
    paddle.set_device(f"gpu:{gpu_id}" if kind == "gpu" else "cpu")
    return kind
