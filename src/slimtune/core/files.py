"""Files and folders written as one unit: a reader sees the old version or the new one, never a mix.

A file: written to a temporary file beside it, flushed and fsynced, then renamed over the target
(``os.replace`` is atomic on POSIX), and the folder is fsynced so the rename itself survives a crash.

A folder (an adapter, a checkpoint, an exported model), in this order:

1. write everything into ``.<name>.new-<random>`` beside the target; fsync each file and the folder;
2. if the target exists, rename it to ``.<name>.old-<random>``;
3. rename the new folder to the target; fsync the parent folder;
4. delete the old folder.

A crash leaves at most one of these in-between states, which :func:`recover_folder` repairs (every
loader of such folders calls it first): a ``.new-`` folder with the target present, or without an
``.old-`` folder, was not finished and is deleted; a ``.new-`` folder next to an ``.old-`` folder
and no target was complete (step 2 only starts after step 1) and is renamed into place; an ``.old-``
folder next to the target is a finished replacement's leftover and is deleted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """slimtune's cache folder: ``$SLIMTUNE_CACHE`` if set, else ``~/.cache/slimtune``."""
    env = os.environ.get("SLIMTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "slimtune"


def fsync_folder(folder: Path) -> None:
    """Make a rename or file creation inside ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        elif path.is_dir():
            fsync_folder(path)
    fsync_folder(root)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, the file written there
    is fsynced and renamed over ``path``. On any error the temporary file is removed and ``path`` is
    untouched."""
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise OSError(error.errno, f"cannot write to {path.parent}: {error.strerror}; choose a writable "
                                   "output folder") from error
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` as one unit (see :func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; when the block ends without error it replaces
    ``final`` whole (the protocol in the module docstring). On any error it is removed and ``final``
    stays as it was."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.new-", dir=final.parent))
    except OSError as error:
        raise OSError(error.errno, f"cannot create a folder in {final.parent}: {error.strerror}; choose a "
                                   "writable output folder") from error
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)  # the old folder moves inside its marker folder
        os.replace(tmp, final)
        fsync_folder(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _leftovers(final: Path, kind: str) -> list[Path]:
    if not final.parent.is_dir():
        return []
    return sorted(p for p in final.parent.glob(f".{final.name}.{kind}-*") if p.is_dir())


def recover_folder(final: str | os.PathLike) -> bool:
    """Repair what an interrupted :func:`atomic_folder` left beside ``final``; True if something changed."""
    final = Path(final)
    new, old = _leftovers(final, "new"), _leftovers(final, "old")
    changed = False
    moved_aside = [o / final.name for o in old if (o / final.name).is_dir()]
    if not final.exists() and moved_aside:
        if new:  # the replacement was complete: step 2 only begins after step 1
            os.replace(new.pop(), final)
        else:  # nothing to replace it with: put the old folder back
            os.replace(moved_aside[-1], final)
        fsync_folder(final.parent)
        changed = True
    for leftover in new + old:
        shutil.rmtree(leftover, ignore_errors=True)
        changed = True
    return changed
