"""The data-parallel job as this process sees it: its rank among the job's processes, and the
few collectives train.py agrees through (sums, flags, broadcast, gather, failing together).

    >>> env = distributed_from_env()      # one process unless launched by paddle.distributed.launch
    >>> env.start(); stop, = env.agree_any(my_flag)
"""
import os
from dataclasses import dataclass

import paddle

from harness import errors


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
