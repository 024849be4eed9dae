"""Where and how the scripts run: device, CPU threads and math library, data-parallel setup.

Shared by train.py, eval.py and scripts/; none of it is needed to use the SWA core.
"""
import ctypes
import os
from dataclasses import dataclass

import paddle

from harness import errors

# Threads per model, from runs on a 2-core AMD EPYC VM (train images/s, batch 64, medians of
# 3-5 fresh processes): VGG16 28.9 on one thread vs 36.6 on two, reliably; PreResNet110
# 39.5 vs 28.3; PreResNet164 24.0 vs anywhere from 17.8 to 28.6 (two threads suffer whenever
# the host is busy; one thread does not); SimpleCNN's tiny convolutions lose to OpenMP's
# overhead. The PreResNets get half the cores, SimpleCNN one, other models all of them.
FEWER_THREADS = {"SimpleCNN": "one", "PreResNet110": "half", "PreResNet164": "half"}


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
    if threads <= 0:
        user = os.environ.get("OMP_NUM_THREADS", "1")
        if user.isdigit() and int(user) > 1:
            threads = int(user)
        else:
            cores = max(1, available_cores() // max(1, processes_per_machine))
            threads = auto_threads(model_name, cores)
    paddle.base.core.set_num_threads(threads)
    keep_freed_memory()
    path = os.environ.get("MKL_DEBUG_CPU_TYPE")
    return f"{threads} CPU thread{'s' if threads > 1 else ''}" + (
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




@dataclass
class Distributed:
    """This process's place in a paddle.distributed.launch job (1 process when not launched),
    and the few collectives the scripts need. Made once, by `distributed_from_env`.

    Every collective here must be called by every rank, in the same order; each one that
    decides something (stop, failure, which checkpoint) gives every rank the same answer,
    so no rank is ever left waiting alone.
    """
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

    def start(self):
        """Join the job's process group (once; nothing when not launched)."""
        if self.enabled and not paddle.distributed.is_initialized():
            paddle.distributed.init_parallel_env()

    def barrier(self):
        if self.enabled:
            paddle.distributed.barrier()

    def all_reduce_sum(self, values):
        """Sums over all ranks of `values` (tensors or numbers), in one float64 all-reduce.

        Returns the sums in the same form: float64 tensors of the same shapes, or floats.
        Every rank receives the same sums, so values derived from them agree bit for bit.
        """
        tensors = [v.astype("float64").flatten() if isinstance(v, paddle.Tensor)
                   else paddle.to_tensor([float(v)], dtype="float64") for v in values]
        if not self.enabled:
            summed = tensors
        else:
            flat = paddle.concat(tensors)
            paddle.distributed.all_reduce(flat)
            summed = paddle.split(flat, [int(t.shape[0]) for t in tensors])
        return [s.reshape(v.shape) if isinstance(v, paddle.Tensor) else float(s.item())
                for s, v in zip(summed, values)]

    def agree_any(self, *flags):
        """For each flag, whether it is set on any rank (one small all-reduce)."""
        if not self.enabled:
            return [bool(f) for f in flags]
        return [s > 0 for s in self.all_reduce_sum([1.0 if f else 0.0 for f in flags])]

    def broadcast(self, value):
        """Rank 0's `value` (any picklable object), on every rank."""
        if not self.enabled:
            return value
        holder = [value]
        paddle.distributed.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather(self, value):
        """Every rank's `value` (picklable), as a list by rank, on every rank."""
        if not self.enabled:
            return [value]
        values = []
        paddle.distributed.all_gather_object(values, value)
        return values

    def on_master(self, fn, *args, **kwargs):
        """Run `fn` on rank 0 only; every rank gets its result, or raises its exception."""
        outcome = None
        if self.is_master:
            try:
                outcome = ("ok", fn(*args, **kwargs))
            except Exception as e:  # handed to every rank, raised there
                outcome = ("error", e)
        kind, value = self.broadcast(outcome)
        if kind == "error":
            raise value
        return value

    def first(self, fn, *args, **kwargs):
        """Run `fn` on rank 0 only: rank 0 gets its result, the other ranks None; if it fails,
        every rank raises its exception."""
        result, outcome = None, None
        if self.is_master:
            try:
                result = fn(*args, **kwargs)
            except Exception as e:  # handed to every rank, raised there
                outcome = e
        outcome = self.broadcast(outcome)
        if outcome is not None:
            raise outcome
        return result

    def together(self, fn, *args, **kwargs):
        """Run `fn` on every rank; if it fails anywhere, it fails everywhere: the failing ranks
        raise their own error, the others OtherRankFailed (the job then ends, not hangs)."""
        try:
            result, error = fn(*args, **kwargs), None
        except Exception as e:
            result, error = None, e
        failed, = self.agree_any(error is not None)
        if error is not None:
            raise error
        if failed:
            raise errors.OtherRankFailed("another process of the job failed (its log says why)")
        return result


def distributed_from_env():
    """Read the launcher's environment (no communication yet)."""
    env = os.environ
    world = int(env.get("PADDLE_TRAINERS_NUM", "1"))
    rank = int(env.get("PADDLE_TRAINER_ID", "0"))
    local_world = int(env.get("PADDLE_LOCAL_SIZE", env.get("PADDLE_NPROC_PER_NODE", "1")) or 1)
    local_rank = int(env.get("PADDLE_LOCAL_RANK", env.get("PADDLE_RANK_IN_NODE", "0")) or 0)
    gpu_id = int(env.get("FLAGS_selected_gpus", str(local_rank)).split(",")[0])
    return Distributed(rank, world, local_rank, max(1, min(local_world, world)), gpu_id)
