"""Run train.py (under paddle.distributed.launch) with a fault injected (test helper).

    python tests/dist_faults.py <fault> <n> <ranks> train.py-args...

fault: "term-step" (SIGTERM to itself while preparing the n-th training batch), "term-epoch"
(SIGTERM to itself right after the n-th epoch's table row, at the epoch boundary), "nan-step"
(the n-th training loss becomes NaN), or "download" (the dataset is missing and Paddle's
download is replaced by a slow writer of a small CIFAR-10 archive; n is a log file that
records each download). ranks: comma-separated ranks that get the fault ("all" for every rank).
"""
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import harness  # noqa: E402

harness.prepare()  # before paddle, as the entry scripts do

import paddle  # noqa: E402

from harness import data  # noqa: E402
from harness import engine  # noqa: E402
import train  # noqa: E402
from harness import session  # noqa: E402

fault, target, ranks = sys.argv[1], sys.argv[2], sys.argv[3]
sys.argv = ["train.py"] + sys.argv[4:]
rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
chosen = ranks == "all" or str(rank) in ranks.split(",")
calls = {"n": 0}


def count():
    calls["n"] += 1
    return chosen and calls["n"] == int(target)


def terminate():
    """SIGTERM to this process, noting when (in the launcher's log folder)."""
    with open(os.path.join(os.environ.get("FAULT_NOTES", "."), f"killed{rank}"), "w") as f:
        f.write(str(time.time()))
    os.kill(os.getpid(), signal.SIGTERM)


if fault == "term-step":
    assemble = data.Batches.assemble

    def counted_assemble(self, plan, step):
        if self.even_shards and count():  # the training loader
            terminate()
        return assemble(self, plan, step)

    data.Batches.assemble = counted_assemble
elif fault == "term-epoch":
    record = session.Run.record

    def counted_record(self, row):
        record(self, row)
        if count():
            terminate()

    session.Run.record = counted_record
elif fault == "nan-step":
    cross_entropy = engine.F.cross_entropy

    def poisoned(logits, labels):
        loss = cross_entropy(logits, labels)
        training = paddle.is_grad_enabled()  # evaluation passes run without gradients
        return loss * float("nan") if training and count() else loss

    engine.F.cross_entropy = poisoned
elif fault == "download":
    from helpers import write_cifar10

    def slow_download(cls_name):
        with open(target, "a") as log:
            log.write(f"rank {rank}\n")
        staging = os.path.join(os.path.dirname(target), f"staging{rank}")
        write_cifar10(staging, per_batch=8, seed=5)
        folder = sys.argv[sys.argv.index("--data_path") + 1]
        with open(os.path.join(staging, "cifar-10-python.tar.gz"), "rb") as f:
            raw = f.read()
        with open(os.path.join(folder, "cifar-10-python.tar.gz"), "wb") as f:
            f.write(raw[:len(raw) // 2])  # as Paddle's download does: straight to the final name
            f.flush()
            time.sleep(1.0)
            f.write(raw[len(raw) // 2:])
        return None  # data._paddle_download's "it worked" (a reason string says why not)

    data._paddle_download = slow_download
else:
    raise SystemExit(f"unknown fault {fault}")

sys.exit(train.main())
