"""Writing files so that a crash never leaves a half-written one: the package's one helper.

Everything tf_explog writes (run files, checkpoints, metrics, reports, NIfTI outputs, cache
entries' metadata, JSON) goes through :func:`atomic_path` or :func:`atomic_write`: the data
go to a temporary file in the same folder, are flushed to disk, and the file is renamed onto
its name (``os.replace``, atomic on POSIX). A kill at any moment leaves either the previous
complete file or the new one, never a truncated one, and a failure removes the temporary
file. New files get the permissions ``open()`` would give them (the user's umask), not the
0600 of ``tempfile.mkstemp``.

Temporary names carry the writer's process id (``.<name>.<pid>-<random>.tmp<suffix>``): a
process killed before its rename leaves one behind, and :func:`remove_stale_temporaries`
(called by the commands on the folders they write) removes those whose process is gone,
never one a live process is still writing.

Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

__all__ = ["atomic_path", "atomic_write", "write_json", "remove_stale_temporaries",
           "temporary_prefix", "temporary_name", "environment_error", "describe_environment_error",
           "ENVIRONMENT_ERRNOS", "FILE_MODE"]

PathLike = Union[str, os.PathLike]


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


#: Permissions of new files (0666 minus the process umask, read once at import).
FILE_MODE = _default_mode()


#: errno values of OSErrors the environment causes (a full disk or quota, a read-only file
#: system, no permission): the user's to fix, not a bug.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM,
                                getattr(errno, "EDQUOT", errno.ENOSPC)})


def _errno_of(err: OSError):
    """``err.errno``, or the one its message names (h5py and some C libraries raise an
    OSError without errno whose text carries the system's message)."""
    if err.errno is not None:
        return err.errno
    text = str(err)
    for code in ENVIRONMENT_ERRNOS:
        if os.strerror(code) in text:
            return code
    return None


def environment_error(err: BaseException) -> bool:
    """Whether ``err`` is an OSError the environment caused (see ``ENVIRONMENT_ERRNOS``)."""
    return isinstance(err, OSError) and _errno_of(err) in ENVIRONMENT_ERRNOS


def describe_environment_error(err: OSError, where: PathLike = None) -> str:
    """``"<path>: <what the system said>; <what to do>"`` for an environment OSError.

    Args:
        err: the error (its ``filename`` names the path when the system gave one).
        where: the path to name when the error has none.
    """
    path = err.filename or where or "?"
    code = _errno_of(err)
    what = os.strerror(code) if code else str(err)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        todo = "free some space (or raise the quota), or write to another disk"
    elif code == errno.EROFS:
        todo = "the file system is read-only: write to a writable folder instead"
    else:
        todo = "make it writable (readable) for this user, or use another folder"
    return f"{path}: {what}; {todo}"


def _suffix(name: str) -> str:
    # nibabel and Keras pick the format from the suffix: keep it on the temporary name.
    for double in (".nii.gz", ".tar.gz", ".weights.h5"):
        if name.endswith(double):
            return double
    return Path(name).suffix


@contextlib.contextmanager
def atomic_path(path: PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """A temporary path next to ``path``; on success it is renamed onto ``path``.

    Use it for writers that want a file name (``nib.save``, ``model.save``)::

        with atomic_path(run / "best.keras") as tmp:
            model.save(tmp)

    The temporary name starts with ``.`` and keeps the suffix. On any exception it is
    removed and ``path`` is left as it was.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false (checked first).
    """
    target = Path(path)
    if not overwrite and target.exists():
        raise FileExistsError(f"{target}: already exists; pass --overwrite (overwrite=True) "
                              "to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(target)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{target}: the writer produced no file")
        with contextlib.suppress(OSError):  # some file systems have no chmod
            os.chmod(tmp, FILE_MODE)
        _fsync(tmp)
        os.replace(tmp, target)
        _fsync_dir(target.parent)  # the rename itself survives a power cut
    except OSError as err:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            tmp.unlink()
        if err.errno is not None and err.filename is not None and (
                os.fspath(err.filename) == os.fspath(tmp)):
            # Name the file the user knows, not the temporary one (which is gone).
            raise type(err)(err.errno, err.strerror, os.fspath(target)) from err
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            tmp.unlink()
        raise


def temporary_name(path: PathLike) -> Path:
    """A free temporary name next to ``path`` (``.<name>.<pid>-<random>.tmp<suffix>``, the
    suffix kept for writers that choose the format by it); nothing is left at that name.

    For a writer that renames several files into place only once all are written; a kill
    leaves them to :func:`remove_stale_temporaries`.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(target.name),
                               suffix=f".tmp{_suffix(target.name)}", dir=target.parent)
    os.close(fd)
    os.unlink(tmp)  # writers that refuse existing files (or append to them) get a free name
    return Path(tmp)


def _fsync(path: Path) -> None:
    """fsync a file or a folder; silently skipped where the system cannot (not every system
    can open a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_fsync_dir = _fsync


def temporary_prefix(name: str) -> str:
    """The start of a temporary name for ``name`` written by this process."""
    return f".{name}.{os.getpid()}-"


# .<name>.<pid>-<random>.tmp<suffix> (files), .tmp-<what>-<pid>-<random> (folders).
_TEMPORARY = re.compile(r"^\.(?:.+\.(\d+)-[^.]+\.tmp.*|tmp-[A-Za-z]+-(\d+)-.+)$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: PathLike) -> list:
    """Removes the temporary files and folders left in ``folder`` (not below it) by writers
    that were killed before their rename: those whose process id is no longer running.

    Returns:
        The paths removed (an unreadable or missing folder removes nothing).
    """
    import shutil

    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if not match or _alive(int(match.group(1) or match.group(2))):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def atomic_write(path: PathLike, data: Union[str, bytes], *, overwrite: bool = True) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically; returns the path."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


def write_json(path: PathLike, obj: Any, *, overwrite: bool = True, indent: int = 1,
               **kwargs) -> Path:
    """``json.dumps(obj)`` written atomically (NumPy scalars and paths are converted)."""
    return atomic_write(path, json.dumps(obj, indent=indent, default=_json_default, **kwargs)
                        + "\n", overwrite=overwrite)


def _json_default(value):
    import numpy as np

    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
