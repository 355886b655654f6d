"""Writing files so that a crash, a full disk or a second process never leaves half a file.

    from fledge.files import write_atomic, atomic_open
    write_atomic(run_dir / "state.json", json.dumps(state))        # str or bytes
    with atomic_open(out_path) as f:                               # a text file, streamed
        for row in rows:
            f.write(json.dumps(row) + "\\n")

Every write goes to a temporary file beside the target whose name is unique to the process
(`.NAME.<pid>-<random>.tmp`), is flushed and fsynced, then renamed over the target. On any
error the temporary file is removed and the target is left as it was. `OSError`s from the
file system (disk full, read-only, permission) become one `StorageError` line that names
the file and what to do; `refuse_special` keeps fledge from writing into FIFOs, devices
and folders a user named by mistake.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import IO, Iterator

from fledge.errors import StorageError

TMP_SUFFIX = ".tmp"


def temp_path(path: str | Path) -> Path:
    """A fresh temporary name beside `path`, unique to this process and call."""
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")


def storage_error(error: OSError, path: str | Path, action: str = "write") -> StorageError:
    """One line for a file-system failure: what, where, what to do."""
    if error.errno == errno.ENOSPC:
        hint = "the disk is full; free some space and run the command again (finished work is kept)"
    elif error.errno == errno.EDQUOT:
        hint = "the disk quota is exhausted; free some space and run the command again"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "fledge may not write there; choose another path or fix the permissions"
    else:
        hint = error.strerror or str(error)
    return StorageError(f"could not {action} {path}: {hint}")


def refuse_special(path: str | Path, what: str = "output") -> Path:
    """`path` as a Path, unless it exists and is not a regular file (a folder, FIFO, device)."""
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        return p
    except OSError as e:
        raise storage_error(e, p, "inspect") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a pipe, socket or device)"
        raise StorageError(f"{what} {p} is {kind}; fledge writes only regular files. Name a file path.")
    return p


def _fsync(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems (and /dev/shm on some kernels) cannot fsync
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8",
                newline: str | None = None) -> Iterator[IO]:
    """Open a temporary file for writing; on success it replaces `path`, on error it vanishes."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes new files only (mode 'w' or 'wb'), not {mode!r}")
    target = refuse_special(path)
    tmp = temp_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode, encoding=None if "b" in mode else encoding,
                  newline=None if "b" in mode else newline) as f:
            yield f
            f.flush()
            _fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        _remove_quietly(tmp)
        raise storage_error(e, target) from None
    except BaseException:
        _remove_quietly(tmp)
        raise
    fsync_dir(target.parent)


def write_atomic(path: str | Path, data: str | bytes, encoding: str = "utf-8") -> Path:
    """Replace `path` with `data` (str is encoded as `encoding`) all at once."""
    with atomic_open(path, "wb") as f:
        f.write(data.encode(encoding) if isinstance(data, str) else data)
    return Path(path)


def replace_folder(new: str | Path, target: str | Path, old: str | Path) -> None:
    """Rename the finished folder `new` to `target`. An existing `target` is first renamed to `old`
    (which the caller has cleared) and put back if the rename fails, then removed. Raises OSError."""
    new, target, old = Path(new), Path(target), Path(old)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(new, target)
        return
    os.replace(target, old)
    try:
        os.replace(new, target)
    except OSError:
        os.replace(old, target)         # put the earlier folder back
        raise
    shutil.rmtree(old, ignore_errors=True)


def refuse_foreign_folder(target: str | Path, marker: str, did: str = "write it") -> None:
    """CheckpointError unless `target` is new, empty, or holds `marker` (a folder fledge wrote and may
    replace): fledge never writes into a folder it did not make. `did`: what fledge did not do there."""
    from fledge.errors import CheckpointError
    target = Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise CheckpointError(f"{target} exists and is not a folder; choose another output with -o DIR.")
    if target.is_dir() and any(target.iterdir()) and not (target / marker).is_file():
        names = sorted(p.name for p in target.iterdir())
        raise CheckpointError(f"{target} exists and fledge did not {did} (no {marker}; it holds "
                              f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}). Choose another output "
                              f"with -o DIR, or move it away.")


def remove_own_folder(folder: str | Path, markers: tuple[str, ...], again: str) -> None:
    """Remove a leftover staging or old folder of an earlier run of this command (it holds one of
    `markers`); refuse anything else in the way (CheckpointError saying to move it and `again`)."""
    from fledge.errors import CheckpointError
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not any((folder / m).is_file() for m in markers):
        raise CheckpointError(f"{folder} is in the way and fledge did not write it; move it away and {again}.")
    shutil.rmtree(folder)


def swap_in_folder(folder: str | Path, target: str | Path, markers: tuple[str, ...], what: str, again: str) -> None:
    """Rename the finished `folder` to `target` (`replace_folder`), an earlier `target` set aside
    beside it first; StorageError naming `what` when the rename fails."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    remove_own_folder(old, markers, again)
    try:
        replace_folder(folder, target, old)
    except OSError as e:
        raise storage_error(e, target, f"rename the {what} folder to") from None


def remove_stale_temps(folder: str | Path, name: str = "*") -> list[Path]:
    """Remove temporary files this module left beside `name` in `folder` (after a kill)."""
    removed = []
    for p in Path(folder).glob(f".{name}.*{TMP_SUFFIX}"):
        if p.is_file() and not p.is_symlink():
            _remove_quietly(p)
            removed.append(p)
    return removed


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
