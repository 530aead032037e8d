"""Run several recipes with the distributed engine in one torchrun launch (one process group, started once):
``torchrun --nproc-per-node 2 worker.py RECIPE...``. Saves the launches' start-up time in the tests."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from slimtune.distributed.run import run_distributed
from slimtune.train.recipe import load_recipe

if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for path in sys.argv[1:]:
            result = run_distributed(load_recipe(path), show_progress=False)
            assert result.finished
    finally:
        dist.destroy_process_group()
