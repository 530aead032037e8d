import os
import sys

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter, which must be chosen before triton is
# first imported (transformers may import it): set first, so every test file passes alone and in any order.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests import tiny_models from any sub-folder
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import strict_deprecations  # noqa: E402

if os.environ.get("SLIMTUNE_STRICT_DEPRECATIONS") == "1":
    strict_deprecations.install()  # before transformers is imported: it binds warnings.warn late anyway

from multi_adapter_cases import family  # noqa: E402,F401 (a fixture several test files share)

# Tiny models run fastest on one thread; two threads on a busy 2-core machine spin far longer.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_deprecated_transformers_calls():
    yield
    found = strict_deprecations.take_offenses()
    if found:
        pytest.fail("slimtune relies on APIs transformers deprecates:\n" + "\n".join(found), pytrace=False)
