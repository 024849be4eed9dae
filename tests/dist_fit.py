"""Launched on 2 processes: a paddle.Model.fit with the SWA callback, data-parallel (test helper).

    python -m paddle.distributed.launch --nproc_per_node 2 tests/dist_fit.py <out_dir>

Writes <out_dir>/rank<r>.npz (the network after fit: the average, BatchNorm refreshed) and
rank<r>.txt (the number of models averaged).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import harness  # noqa: E402

harness.prepare()  # before paddle, as the entry scripts do

import numpy as np  # noqa: E402
import paddle  # noqa: E402

import callbacks  # noqa: E402
from harness import data  # noqa: E402
import models  # noqa: E402


class Images(paddle.io.Dataset):
    def __init__(self, split, ds):
        self.x = ((split.images.astype("float32") / 255 - ds.mean) / ds.std).transpose(0, 3, 1, 2)
        self.y = split.labels

    def __getitem__(self, i):
        return self.x[i], self.y[i:i + 1]

    def __len__(self):
        return len(self.y)


paddle.distributed.init_parallel_env()
ds = data.load_dataset("digits")
paddle.seed(0)
network = models.build("SimpleCNN", 10, 1)
model = paddle.Model(network)
model.prepare(paddle.optimizer.Momentum(0.05, parameters=network.parameters()),
              paddle.nn.CrossEntropyLoss())
swa = callbacks.SWACallback(swa_start=2, swa_lr=0.02, bn_data=Images(ds.train, ds))
model.fit(Images(ds.train, ds), epochs=3, batch_size=64, verbose=0, callbacks=[swa])
rank = paddle.distributed.get_rank()
os.makedirs(sys.argv[1], exist_ok=True)
np.savez(os.path.join(sys.argv[1], f"rank{rank}.npz"), **{k: v.numpy() for k, v in network.state_dict().items()})
with open(os.path.join(sys.argv[1], f"rank{rank}.txt"), "w") as f:
    f.write(f"{swa.swa.n} {int(swa.swa.bn_updated)}")
