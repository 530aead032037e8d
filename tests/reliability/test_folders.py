"""The in-between states of a folder write (core/files.py's protocol), each made by hand: a loader repairs them
before reading (or says a live writer is at work), and never takes a half-written folder for a complete one."""

from __future__ import annotations

import os
import shutil
import stat

import pytest
from tiny_models import tiny_llama

import slimtune
from slimtune.core.files import atomic_write, lock_file, recover_folder


@pytest.fixture()
def versions(tmp_path):
    """Two complete adapter folders (old, new) to build the states from."""
    model = slimtune.add_adapter(tiny_llama(), slimtune.LoraConfig(r=4, target_modules=["q_proj"],
                                                                   init_lora_weights=False))
    old = slimtune.save_adapter(model, tmp_path / "versions" / "old")
    slimtune.save_adapter(slimtune.add_adapter(tiny_llama(seed=1), slimtune.LoraConfig(
        r=4, target_modules=["q_proj"], init_lora_weights=False)), tmp_path / "versions" / "new")
    return old, tmp_path / "versions" / "new"


def content(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def names(parent):
    return sorted(p.name for p in parent.iterdir())


@pytest.mark.parametrize("state, expected", [
    ("new beside target", "old"),          # crashed while writing: the new one is unfinished
    ("lone new", None),                    # first save crashed while writing: nothing there
    ("old aside, new complete", "new"),    # crashed between moving the old aside and renaming the new in
    ("old aside, new gone", "old"),        # the same, the new one deleted by hand: the old one goes back
    ("old beside target", "new"),          # crashed before deleting the replaced folder
    ("trash", None),                       # crashed while deleting a folder
])
def test_each_in_between_state_is_repaired_before_loading(tmp_path, versions, state, expected):
    old, new = versions
    parent = tmp_path / "run"
    parent.mkdir()
    target = parent / "adapter"
    if state == "new beside target":
        shutil.copytree(old, target)
        shutil.copytree(new, parent / ".adapter.new-ab12")
        (parent / ".adapter.new-ab12" / "adapter_model.safetensors").write_bytes(b"half")
    elif state == "lone new":
        shutil.copytree(new, parent / ".adapter.new-ab12")
        (parent / ".adapter.new-ab12" / "adapter_config.json").unlink()
    elif state.startswith("old aside"):
        shutil.copytree(old, parent / ".adapter.old-ab12" / "adapter")
        if state.endswith("complete"):
            shutil.copytree(new, parent / ".adapter.new-ab12")
    elif state == "old beside target":
        shutil.copytree(new, target)
        shutil.copytree(old, parent / ".adapter.old-ab12" / "adapter")
    else:
        shutil.copytree(old, parent / ".adapter.trash-ab12")
    if expected is None:
        with pytest.raises(FileNotFoundError, match="does not exist"):
            slimtune.load_adapter(tiny_llama(), target)
    else:
        slimtune.load_adapter(tiny_llama(), target)
        assert content(target) == content(old if expected == "old" else new)
    assert names(parent) == (["adapter"] if expected else [])
    assert not recover_folder(target)  # nothing left to repair


def test_a_live_writers_folder_is_left_alone_and_named(tmp_path, versions):
    _, new = versions
    parent = tmp_path / "run"
    writing = parent / ".adapter.new-cd34"
    shutil.copytree(new, writing)
    fd = os.open(writing, os.O_RDONLY)  # what atomic_folder holds while it writes
    try:
        assert lock_file(fd) is True
        with pytest.raises(FileNotFoundError, match="another process is writing it right now"):
            slimtune.load_adapter(tiny_llama(), parent / "adapter")
        assert names(parent) == [".adapter.new-cd34"]
    finally:
        os.close(fd)
    assert recover_folder(parent / "adapter") and names(parent) == []  # its writer died: unfinished, deleted


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_and_folders_get_the_modes_the_umask_gives(tmp_path, umask):
    """Temporary names are created private (0600 / 0700); what lands under the final name has the mode a plain
    open / mkdir would give, so others may read an adapter or a run as they may read the user's other files."""
    previous = os.umask(umask)
    try:
        model = slimtune.add_adapter(tiny_llama(), slimtune.LoraConfig(r=4, target_modules=["q_proj"]))
        folder = slimtune.save_adapter(model, tmp_path / "adapter")
        atomic_write(tmp_path / "summary.json", b"{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    for file in [*folder.iterdir(), tmp_path / "summary.json"]:
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file
