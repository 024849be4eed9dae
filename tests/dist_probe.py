"""Run train.py and record, per rank, its final state and the files it wrote (test helper).

    python tests/dist_probe.py <probe_dir> train.py-args...

Writes <probe_dir>/rank<r>.npz (final SGD and SWA state) and rank<r>.json (checkpoint saves
and run records this rank made).
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import harness  # noqa: E402

harness.prepare()  # before paddle, as the entry scripts do

import numpy as np  # noqa: E402

from harness import checkpoints  # noqa: E402
from harness import engine  # noqa: E402
from harness import report  # noqa: E402
from harness import rundir  # noqa: E402
import train  # noqa: E402
from harness import session  # noqa: E402
import utils  # noqa: E402

probe_dir = sys.argv[1]
sys.argv = ["train.py"] + sys.argv[2:]
rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
record = {"saves": 0, "record_run": 0, "metrics_files": 0, "test_counts": []}
captured = {}

real_save, real_record, real_setup = checkpoints.save_checkpoint, rundir.record_run, session.setup
real_metrics_init, real_evaluate = report.MetricsFile.__init__, engine.evaluate_pass


def counting_save(*args, **kwargs):
    record["saves"] += 1
    return real_save(*args, **kwargs)


def counting_record(*args, **kwargs):
    record["record_run"] += 1
    return real_record(*args, **kwargs)


def counting_metrics(self, *args, **kwargs):
    record["metrics_files"] += 1
    return real_metrics_init(self, *args, **kwargs)


def capturing_setup(*args):
    run, start = real_setup(*args)
    captured["run"] = run
    return run, start


def counting_evaluate(batches, model, **kwargs):
    result = real_evaluate(batches, model, **kwargs)
    record["test_counts"].append(result["count"])
    return result


checkpoints.save_checkpoint, rundir.record_run, session.setup = counting_save, counting_record, capturing_setup
report.MetricsFile.__init__, engine.evaluate_pass = counting_metrics, counting_evaluate
code = train.main()
run = captured["run"]
state = {f"sgd/{k}": v.numpy() for k, v in run.model.state_dict().items()}
state.update({f"swa/{k}": v.numpy() for k, v in run.swa.model.state_dict().items()})
if isinstance(run.swa, utils.SWAG):
    state["swag/var_sum"] = run.swa.var_sum.numpy()
    state.update({f"swag/deviation{i}": d.numpy() for i, d in enumerate(run.swa.deviations)})
os.makedirs(probe_dir, exist_ok=True)
np.savez(os.path.join(probe_dir, f"rank{rank}.npz"), **state)
with open(os.path.join(probe_dir, f"rank{rank}.json"), "w") as f:
    json.dump(record, f)
sys.exit(code)
