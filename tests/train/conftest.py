"""Fixtures of the training-engine tests: an isolated cache, tiny tokenizers, the pycode child process."""

from __future__ import annotations

import pytest
from train_helpers import isolated_cache, make_tokenizer  # noqa: F401 - isolated_cache: a session fixture

PYCODE_DIGEST = (
    "import hashlib, json; from slimtune.train.pycode import pycode_examples; "
    "print(hashlib.sha256(json.dumps(pycode_examples(cache=False)).encode()).hexdigest())"
)


@pytest.fixture(scope="session", autouse=True)
def pycode_child(request, tmp_path_factory):
    """A separate process that builds the pycode dataset from scratch, for the determinism test.

    Started when the session begins (only if that test is selected), so its ~8 s of parsing runs on
    the second core while the other tests run. Another hash seed: set-order or hash() bugs show.
    """
    import os
    import subprocess
    import sys

    if not any(item.name == "test_build_is_identical_across_processes" for item in request.session.items):
        yield None
        return
    env = {**os.environ, "PYTHONHASHSEED": "12345", "SLIMTUNE_CACHE": str(tmp_path_factory.mktemp("child"))}
    child = subprocess.Popen([sys.executable, "-c", PYCODE_DIGEST], env=env, stdout=subprocess.PIPE, text=True)
    yield child
    if child.poll() is None:
        child.kill()
    child.communicate()


@pytest.fixture(scope="session")
def chat_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def plain_tokenizer():
    """No chat template, and a pad token distinct from EOS."""
    return make_tokenizer(chat_template=None, pad_token="<pad>")
