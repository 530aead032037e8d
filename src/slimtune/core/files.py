"""Files and folders written as one unit: a reader sees the old version or the new one, never a mix.

A file (:func:`atomic_file`): written to a temporary file beside it, flushed and fsynced, then renamed
over the target (``os.replace`` is atomic on POSIX), and the folder is fsynced so the rename itself
survives a crash.

A folder (an adapter, a checkpoint, an exported model; :func:`atomic_folder`), in this order:

1. write everything into ``.<name>.new-<id>`` beside the target; fsync each file and folder in it;
2. if the target exists, move it into ``.<name>.old-<id>`` (same ``<id>``: the pair belongs together);
3. rename ``.<name>.new-<id>`` to the target; fsync the parent folder;
4. delete ``.<name>.old-<id>``.

The writer holds an exclusive ``flock`` on its ``.new-`` folder until it is done, so a reader can tell a
live writer from a crashed one. A crash leaves at most one in-between state, which
:func:`recover_folder` repairs (every loader of such folders calls it first; a folder a live writer
holds is left alone):

- ``.new-<id>`` with the target present, or with no ``.old-<id>`` beside it: unfinished (steps 1-2) — deleted;
- ``.old-<id>`` holding the old folder, no target: the crash fell between steps 2 and 3, so
  ``.new-<id>`` is complete (step 2 only starts after step 1) — renamed into place; without it (deleted
  by hand) the old folder goes back;
- ``.old-<id>`` beside the target: a finished replacement's leftover — deleted;
- ``.<name>.trash-<id>``: a folder :func:`remove_folder` was deleting — deleted.

A half-written folder is therefore never found under the target's name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType

from safetensors import SafetensorError

from slimtune.errors import SaveError

fcntl: ModuleType | None
try:  # POSIX: a live writer's .new- folder is flock'ed; elsewhere every leftover counts as a crash's
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

CHUNK = 1 << 20  # bytes per os.write: a crash can cut a file between any two of them


def cache_root() -> Path:
    """slimtune's cache folder: ``$SLIMTUNE_CACHE`` if set, else ``~/.cache/slimtune``."""
    env = os.environ.get("SLIMTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "slimtune"


def fsync_folder(folder: Path) -> None:
    """Make a rename or file creation inside ``folder`` durable (skipped where folders cannot be opened or
    fsynced: some file systems answer EINVAL)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike, data: bytes) -> None:
    """Create ``path`` holding ``data``, written in chunks and fsynced (inside a temporary folder or file of
    the protocol above; on its own it is not atomic). Missing parent folders are made (inside that temporary
    folder: an adapter's bundled adapters, a checkpoint's adapter)."""
    if not Path(path).parent.is_dir():
        Path(path).parent.mkdir(parents=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view[:CHUNK])
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif path.is_dir() and not path.is_symlink():
            fsync_folder(path)
    fsync_folder(root)


def os_error(error: BaseException) -> OSError | None:
    """``error`` as the OS error it is or reports: safetensors' writer raises its own error type with the OS's
    ``(os error 28)`` in the message (a full disk)."""
    if isinstance(error, OSError):
        return error
    found = re.search(r"\(os error (\d+)\)", str(error)) if isinstance(error, SafetensorError) else None
    return OSError(int(found.group(1)), os.strerror(int(found.group(1)))) if found else None


def _save_error(error: OSError, what: Path, kept: str) -> SaveError:
    reason = error.strerror or str(error)
    hint = {errno.ENOSPC: "free some disk space", errno.EDQUOT: "free some disk space (quota)",
            errno.EROFS: "the file system is read-only: choose a writable location",
            errno.EACCES: "you lack write permission there: choose a writable location",
            errno.EFBIG: "the file is larger than the file system or the process's file-size limit (ulimit -f) "
                         "allows"}.get(
        error.errno or 0, "choose a writable location with free space")
    return SaveError(error.errno or errno.EIO, f"cannot write {what}: {reason}; {hint}. {kept}")


def process_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux), else set and restored."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_if_created(path: Path, folder: bool) -> None:
    """Give a temporary file (0600) or folder (0700) the mode ``open`` / ``mkdir`` would have: readable by those
    the umask lets read, as every other file the user writes."""
    os.chmod(path, (0o777 if folder else 0o666) & ~process_umask())


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, the file written there
    is fsynced and renamed over ``path``. On any error the temporary file is removed, ``path`` is untouched,
    and an OS error is raised as :class:`~slimtune.errors.SaveError` naming ``path``."""
    path = Path(path)
    kept = f"{path.name} was left as it was." if path.exists() else f"{path.name} was not created."
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _save_error(error, path, kept) from error
    os.close(fd)
    tmp = Path(name)
    try:
        _as_if_created(tmp, folder=False)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except Exception as error:
        failed = os_error(error)
        if failed is None or isinstance(error, SaveError):
            raise
        raise _save_error(failed, path, kept) from error
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` as one unit (see :func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        write_file(tmp, data)


def lock_file(fd: int, blocking: bool = False) -> bool | None:
    """Take an exclusive ``flock`` on ``fd``: True if taken, False if another process holds it, None where
    the platform or file system has no ``flock`` (then nobody can hold it)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
            return None
        raise
    return True


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; when the block ends without error it replaces
    ``final`` whole (the protocol in the module docstring). On any error it is removed, ``final`` stays as
    it was, and an OS error is raised as :class:`~slimtune.errors.SaveError` naming ``final``."""
    final = Path(final)
    if final.is_dir() and (os.path.ismount(final) or final.resolve() == Path.cwd().resolve()):
        kind = "a mount point" if os.path.ismount(final) else "the current folder"
        raise ValueError(f"cannot replace {final} as a whole (it is {kind}): write into a folder inside it, e.g. "
                         f"{final / 'out'}.")
    kept = f"The previous {final.name} is intact." if final.exists() else f"{final.name} was not created."
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        recover_folder(final)  # a crashed earlier save's leftovers go before this one starts
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.new-", dir=final.parent))
        _as_if_created(tmp, folder=True)
    except OSError as error:
        raise _save_error(error, final, kept) from error
    token = tmp.name.rsplit(".new-", 1)[1]
    old = final.parent / f".{final.name}.old-{token}"
    lock = os.open(tmp, os.O_RDONLY)
    try:
        lock_file(lock, blocking=True)
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            old.mkdir()
            os.replace(final, old / final.name)  # the old folder moves inside its marker folder
        os.replace(tmp, final)
        kept = f"The new {final.name} is in place, but the rename may not survive a power cut."
        fsync_folder(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as error:
        if not final.exists() and (old / final.name).is_dir():  # failed between steps 2 and 3: put it back
            with contextlib.suppress(OSError):
                os.replace(old / final.name, final)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        failed = os_error(error)
        if failed is not None and not isinstance(error, SaveError):
            raise _save_error(failed, final, kept) from error
        raise
    finally:
        os.close(lock)


def remove_folder(path: str | os.PathLike) -> None:
    """Delete a folder so that a crash midway never leaves part of it under its name: it is renamed to
    ``.<name>.trash-<id>`` first (which :func:`recover_folder` deletes), then deleted."""
    path = Path(path)
    if not path.exists():
        return
    trash = path.parent / f".{path.name}.trash-{secrets.token_hex(4)}"
    os.replace(path, trash)
    fsync_folder(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>new|old|trash)-(?P<token>[^.]+)$")


def leftover_targets(parent: str | os.PathLike) -> list[Path]:
    """Targets in ``parent`` that have leftovers of an interrupted :func:`atomic_folder` or :func:`remove_folder`."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    found = {m.group("name") for p in parent.iterdir() if (m := _LEFTOVER.match(p.name))}
    return [parent / name for name in sorted(found)]


def _leftovers(final: Path) -> dict[str, dict[str, Path]]:
    """``{kind: {token: path}}`` of the leftovers beside ``final``."""
    out: dict[str, dict[str, Path]] = {"new": {}, "old": {}, "trash": {}}
    if final.parent.is_dir():
        for path in final.parent.iterdir():
            match = _LEFTOVER.match(path.name)
            if match and match.group("name") == final.name and path.is_dir() and not path.is_symlink():
                out[match.group("kind")][match.group("token")] = path
    return out


def _writer_alive(new: Path) -> bool:
    """Whether a live process still holds ``new`` (an :func:`atomic_folder` in progress)."""
    try:
        fd = os.open(new, os.O_RDONLY)
    except OSError:
        return False
    try:
        return lock_file(fd) is False
    finally:
        os.close(fd)


def writer_in_progress(final: str | os.PathLike) -> bool:
    """Whether another live process is writing ``final`` right now."""
    return any(_writer_alive(p) for p in _leftovers(Path(final))["new"].values())


def recover_folder(final: str | os.PathLike) -> bool:
    """Repair what an interrupted :func:`atomic_folder` or :func:`remove_folder` left beside ``final`` (the
    rules in the module docstring); True if something changed. Leftovers of a live writer stay."""
    final = Path(final)
    found = _leftovers(final)
    live = {token for token, path in found["new"].items() if _writer_alive(path)}
    changed = False
    for token, old in sorted(found["old"].items()):
        if token in live:
            continue
        moved_aside = old / final.name
        if not final.exists() and moved_aside.is_dir():
            new = found["new"].pop(token, None)
            os.replace(new if new is not None else moved_aside, final)
            fsync_folder(final.parent)
        shutil.rmtree(old, ignore_errors=True)
        changed = True
    for token, new in found["new"].items():
        if token not in live:
            shutil.rmtree(new, ignore_errors=True)
            changed = True
    for trash in found["trash"].values():
        shutil.rmtree(trash, ignore_errors=True)
        changed = True
    return changed


# What ``save_pretrained`` writes into a model folder (weights, shards and their index, configs, tokenizer files).
MODEL_FOLDER_FILE = re.compile(
    r"(config|generation_config|tokenizer_config|special_tokens_map|added_tokens|preprocessor_config)\.json"
    r"|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|chat_template\.(jinja|json)"
    r"|tokenizer\.(json|model)|vocab\.(json|txt)|merges\.txt|spiece\.model|sentencepiece\.bpe\.model"
    r"|sentencepiece\.model|spm(_char)?\.model|(source|target)\.spm|tekken\.json|additional_chat_templates")


def check_creatable(path: str | os.PathLike, what: str) -> None:
    """Raise a ``ValueError`` unless the folders above ``path`` exist or can be made (no file in the way)."""
    probe = Path(path).parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"cannot write {what} to {path}: {probe} is a file, not a folder; choose another path.")


def check_replaceable(final: str | os.PathLike, ours: Callable[[str], bool], inputs: Iterable[str | os.PathLike] = (),
                      what: str = "the output") -> None:
    """Refuse to replace the folder ``final`` (as :func:`atomic_folder` does) when that would delete something
    that is not the output's own: a file, files in it that ``ours`` does not recognise (the user's), or one of
    the ``inputs`` the output is made from (the folder itself, or a folder inside it)."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise ValueError(f"cannot write {what} to {final}: it is a file; pass a folder path.")
    target = final.resolve()
    for source in inputs:
        resolved = Path(source).resolve()
        if resolved == target or target in resolved.parents:
            raise ValueError(f"cannot write {what} to {final}: replacing it would delete {source}, which it is made "
                             "from; choose another folder.")
    if final.is_dir():
        foreign = sorted(p.name for p in final.iterdir() if not ours(p.name))
        if foreign:
            raise ValueError(f"cannot write {what} to {final}: the folder holds other files ({foreign[:3]}), which "
                             "replacing it would delete; write into an empty or new folder.")


def check_name(name: object, what: str, most_bytes: int = 255) -> str:
    """``name`` if it can be one path component (an adapter name, a sub-folder): a non-empty string
    without ``/``, ``\\``, NUL or a leading dot (so neither ``..`` nor a hidden name), at most ``most_bytes``
    bytes in UTF-8 (a file system's limit is 255 bytes, which folder names made from it must leave room in);
    else a ``ValueError`` saying so."""
    if not isinstance(name, str) or not name or len(name.encode("utf-8", "surrogatepass")) > most_bytes or \
            name.startswith(".") or any(c in name for c in "/\\\0"):
        raise ValueError(f"{what} {name!r:.80} cannot name a file or folder: use a non-empty name without '/', "
                         f"'\\', NUL or a leading dot, of at most {most_bytes} bytes in UTF-8.")
    return name


def inside(root: str | os.PathLike, *parts: str) -> Path:
    """``root / parts…``, refusing a path that would leave ``root``: absolute parts, ``..``, or a symlink
    on the way (checked for what exists now)."""
    root = Path(root)
    path = root
    for part in parts:
        for piece in Path(part).parts:
            if Path(piece).is_absolute() or piece in ("..", "") or "\0" in piece:
                raise ValueError(f"{os.path.join(*parts)!r} leaves {root}: use a relative path without '..'.")
            path = path / piece
            if path.is_symlink():
                raise ValueError(f"{path} is a symbolic link; slimtune does not follow links out of {root}. "
                                 "Replace it with a real folder.")
    return path
