"""Run train.py in this process and signal it at a chosen point (a helper of the tests).

    python tests/interrupt.py <point> <n> <signal> train.py-args...

point: "step" (as the training loader assembles its n-th batch in this process; with
--num_workers, batches are assembled ahead of the steps using them), "save" (at the n-th
paddle.save, of a checkpoint or an FGE snapshot, once its temporary file is cut to half),
"bn" (when the n-th BatchNorm refresh asks for its second batch) or "plot" (at the n-th
figure written, a PNG signature already in the file). signal: KILL, TERM or INT.
"""
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import harness  # noqa: E402

harness.prepare()  # before paddle, as the entry scripts do
import paddle  # noqa: E402

from harness import data  # noqa: E402
import train  # noqa: E402
import utils  # noqa: E402

point, target, signame = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sys.argv = ["train.py"] + sys.argv[4:]
calls = {"n": 0}


def hit():
    calls["n"] += 1
    if calls["n"] == target:
        os.kill(os.getpid(), getattr(signal, "SIG" + signame))
        return True
    return False


if point == "step":
    assemble = data.Batches.assemble

    def counted_assemble(self, plan, step):
        if self.even_shards:  # the training loader
            hit()
        return assemble(self, plan, step)

    data.Batches.assemble = counted_assemble
elif point == "save":
    real_save = paddle.save

    def half_save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        if calls["n"] + 1 == target:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
        hit()

    paddle.save = half_save
elif point == "bn":
    real_bn_update = utils.bn_update

    def dying_bn_update(loader, model):
        def batches():
            for i, batch in enumerate(loader):
                if i == 1 and calls["n"] == target:
                    os.kill(os.getpid(), getattr(signal, "SIG" + signame))
                yield batch
        calls["n"] += 1
        return real_bn_update(batches(), model)

    utils.bn_update = dying_bn_update
elif point == "plot":
    import matplotlib.figure

    real_savefig = matplotlib.figure.Figure.savefig

    def interrupted_savefig(self, path, *args, **kwargs):
        with open(path, "wb") as f:  # part of an image on disk, as when the signal comes
            f.write(b"\x89PNG\r\n\x1a\n")
        if not hit():
            real_savefig(self, path, *args, **kwargs)

    matplotlib.figure.Figure.savefig = interrupted_savefig
else:
    raise SystemExit(f"unknown point {point}")

sys.exit(train.main())
