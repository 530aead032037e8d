import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests import tiny_models from any sub-folder
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
