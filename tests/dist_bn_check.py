"""Launched on 2 processes: the distributed BatchNorm refresh against a single-process one.

    python -m paddle.distributed.launch --nproc_per_node 2 tests/dist_bn_check.py <out_dir>

Each rank refreshes a SimpleCNN's statistics from its own shard (harness.engine.bn_update); every
rank also refreshes a copy alone over both shards' batches in sequence. The same for a model
of SyncBatchNorm layers, with 2 batches on rank 0 and 1 on rank 1. Then a refresh that fails
on rank 1 only. Writes <out_dir>/rank<r>.npz with all statistics, and <out_dir>/rank<r>.txt
with what the failing refresh raised on that rank and whether its statistics came back.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import harness  # noqa: E402

harness.prepare()  # before paddle, as the entry scripts do

import copy  # noqa: E402

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.distributed as dist  # noqa: E402

import models  # noqa: E402
import utils  # noqa: E402
from harness import distributed, engine, errors  # noqa: E402

dist.init_parallel_env()
rank, world = dist.get_rank(), dist.get_world_size()
context = distributed.Distributed(rank, world)
rng = np.random.default_rng(0)
images = (rng.standard_normal((203, 3, 12, 12)) * 1.7 + 0.4).astype("float32")
shards = [images[r::world] for r in range(world)]  # 102 and 101 samples: ragged batches


def batches(data, size=16):
    return [paddle.to_tensor(data[i:i + size]) for i in range(0, len(data), size)]


paddle.seed(3)
model = models.build("SimpleCNN", num_classes=4, in_channels=3)
alone = copy.deepcopy(model)
seen = engine.bn_update(batches(shards[rank]), model, context)
seen_alone = utils.bn_update([b for shard in shards for b in batches(shard)], alone)
assert seen == seen_alone == 203, (seen, seen_alone)


# SyncBatchNorm with 2 batches on rank 0 and 1 on rank 1: must neither hang nor differ.
sync = paddle.nn.Sequential(paddle.nn.SyncBatchNorm(3), paddle.nn.Conv2D(3, 2, 3), paddle.nn.SyncBatchNorm(2))
sync_alone = copy.deepcopy(sync)
engine.bn_update(batches(shards[rank], size=101), sync, context)
utils.bn_update([b for shard in shards for b in batches(shard, size=101)], sync_alone)


def stats(m):
    return {f"{name}": p.numpy() for name, p in m.named_parameters() if name.endswith(("_mean", "_variance"))}


os.makedirs(sys.argv[1], exist_ok=True)
np.savez(os.path.join(sys.argv[1], f"rank{rank}.npz"),
         **{"dist/" + k: v for k, v in stats(model).items()},
         **{"alone/" + k: v for k, v in stats(alone).items()},
         **{"dist/sync/" + k: v for k, v in stats(sync).items()},
         **{"alone/sync/" + k: v for k, v in stats(sync_alone).items()})


# A refresh failing on rank 1 after its first batch: both ranks raise, none hangs, and both
# keep the statistics they had (rank 0's own refresh went through and is undone).
failing = copy.deepcopy(model)
before = stats(failing)


def fails_on_rank_1():
    shard = batches(shards[rank])
    yield shard[0]
    if rank == 1:
        raise RuntimeError("disk gone")
    yield from shard[1:]


try:
    engine.bn_update(fails_on_rank_1(), failing, context)
    outcome = "nothing raised"
except errors.OtherRankFailed:
    outcome = "OtherRankFailed"
except RuntimeError as e:
    outcome = f"own error: {e}"
kept = all(np.array_equal(value, before[key]) for key, value in stats(failing).items())
with open(os.path.join(sys.argv[1], f"rank{rank}.txt"), "w") as f:
    f.write(f"{outcome}; statistics {'kept' if kept else 'changed'}")
