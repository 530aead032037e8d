import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests import tiny_models from any sub-folder
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# Tiny models run fastest on one thread; two threads on a busy 2-core machine spin far longer.
torch.set_num_threads(1)
