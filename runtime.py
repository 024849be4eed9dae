"""Where and how the scripts run: device, CPU threads and math library, data-parallel setup.

Shared by train.py, eval.py and scripts/; none of it is needed to use the SWA core.
"""
import os
import warnings
from dataclasses import dataclass

# Paddle warns at import that no compiler cache (ccache) is installed, which matters only
# for building C++ extensions, and at BatchNorm forwards in training mode that statistics
# are tracked. Neither tells a user of these scripts anything; the filters must be in place
# before Paddle is first imported, so entry scripts import this module first.
warnings.filterwarnings("ignore", message="No ccache found")
warnings.filterwarnings("ignore", message="When training, we now always track")

import paddle  # noqa: E402

# Models with few multiply-adds per image spend their time in per-op overhead; on the
# machines we measured, one thread trains them faster than several (see README).
SINGLE_THREAD_MODELS = {"SimpleCNN"}


def available_cores():
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpu_vendor():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def tune_cpu(threads=0, model_name=None, processes_per_machine=1):
    """Choose the CPU thread count and math-library code path; returns a description.

    Must run before the first matrix product (MKL reads its environment when it first
    loads). Paddle pins one thread unless told otherwise; this uses all cores available
    to each process, except for models in SINGLE_THREAD_MODELS. On AMD CPUs the MKL
    bundled with Paddle takes a slow generic path unless MKL_DEBUG_CPU_TYPE=5 selects its
    AVX2 kernels (2-3x faster convolutions here); a value the user set is kept.

    Args:
        threads: thread count; 0 picks one as above, unless OMP_NUM_THREADS > 1 was set.
        model_name: the model to be trained (decides the automatic count).
        processes_per_machine: processes sharing this machine's cores.
    """
    if threads <= 0:
        user = os.environ.get("OMP_NUM_THREADS", "1")
        if user.isdigit() and int(user) > 1:
            threads = int(user)
        elif model_name in SINGLE_THREAD_MODELS:
            threads = 1
        else:
            threads = max(1, available_cores() // max(1, processes_per_machine))
    if "MKL_DEBUG_CPU_TYPE" not in os.environ and _cpu_vendor() == "AuthenticAMD":
        os.environ["MKL_DEBUG_CPU_TYPE"] = "5"
    paddle.base.core.set_num_threads(threads)
    path = os.environ.get("MKL_DEBUG_CPU_TYPE")
    return f"{threads} CPU thread{'s' if threads > 1 else ''}" + (
        f", MKL_DEBUG_CPU_TYPE={path}" if path else "")


def has_gpu():
    return paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


class DeviceError(ValueError):
    """The requested device is not available."""


def select_device(choice, gpu_id=0):
    """Set Paddle's device from --device (auto/cpu/gpu) and return "cpu" or "gpu"."""
    if choice == "gpu" and not has_gpu():
        raise DeviceError("--device gpu: this Paddle has no usable GPU (install the "
                          "paddlepaddle-gpu wheel for your CUDA from Paddle's install guide), "
                          "or use --device cpu")
    kind = "gpu" if choice == "gpu" or (choice == "auto" and has_gpu()) else "cpu"
    paddle.set_device(f"gpu:{gpu_id}" if kind == "gpu" else "cpu")
    return kind


@dataclass
class Distributed:
    """This process's place in a paddle.distributed.launch job (1 process when not launched)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    gpu_id: int = 0                 # the GPU the launcher gave this process

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_master(self):
        return self.rank == 0


def distributed_from_env():
    """Read the launcher's environment (no communication yet)."""
    env = os.environ
    world = int(env.get("PADDLE_TRAINERS_NUM", "1"))
    rank = int(env.get("PADDLE_TRAINER_ID", "0"))
    local_world = int(env.get("PADDLE_LOCAL_SIZE", env.get("PADDLE_NPROC_PER_NODE", "1")) or 1)
    local_rank = int(env.get("PADDLE_LOCAL_RANK", env.get("PADDLE_RANK_IN_NODE", "0")) or 0)
    gpu_id = int(env.get("FLAGS_selected_gpus", str(local_rank)).split(",")[0])
    return Distributed(rank, world, local_rank, max(1, min(local_world, world)), gpu_id)
