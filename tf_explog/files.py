"""Writing files so that a crash never leaves a half-written one: the package's one helper.

Everything tf_explog writes (run files, checkpoints, metrics, reports, NIfTI outputs, cache
entries' metadata, JSON) goes through :func:`atomic_path` or :func:`atomic_write`: the data
go to a temporary file in the same folder, are flushed to disk, and the file is renamed onto
its name (``os.replace``, atomic on POSIX). A kill at any moment leaves either the previous
complete file or the new one, never a truncated one, and a failure removes the temporary
file. New files get the permissions ``open()`` would give them (the user's umask), not the
0600 of ``tempfile.mkstemp``.

Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

__all__ = ["atomic_path", "atomic_write", "write_json", "FILE_MODE"]

PathLike = Union[str, os.PathLike]


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


#: Permissions of new files (0666 minus the process umask, read once at import).
FILE_MODE = _default_mode()


def _suffix(name: str) -> str:
    # nibabel and Keras pick the format from the suffix: keep it on the temporary name.
    for double in (".nii.gz", ".tar.gz"):
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
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{_suffix(target.name)}",
                               dir=target.parent)
    os.close(fd)
    os.unlink(tmp)  # writers that refuse existing files (or append to them) get a free name
    tmp = Path(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{target}: the writer produced no file")
        with contextlib.suppress(OSError):  # some file systems have no chmod
            os.chmod(tmp, FILE_MODE)
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            tmp.unlink()
        raise


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
