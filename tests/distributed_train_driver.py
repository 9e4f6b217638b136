"""Run by tests/test_distributed.py in each training process (torchrun, accelerate launch or plain python):
trains with `qmop_tools.train.main(argv)` and, on the main process, writes what the test compares to the JSON file
named by $QMOP_RESULT: the world size, the distributed engine and the training log."""

import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

torch.set_num_threads(1)  # two processes share the test machine's cores

from qmop_tools.train import main  # noqa: E402

if __name__ == "__main__":
    result = main(sys.argv[1:])
    trainer = result.trainer
    if trainer.is_world_process_zero():
        report = {
            "world_size": trainer.args.world_size,
            "distributed_type": trainer.accelerator.distributed_type.value,
            "log": [entry for entry in trainer.state.log_history if "loss" in entry],
        }
        with open(os.environ["QMOP_RESULT"], "w") as f:
            json.dump(report, f)
