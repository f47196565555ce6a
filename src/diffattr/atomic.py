"""Atomic file writes: an output either exists complete or not at all, so Snakemake never sees a half-written file."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .exceptions import DiskFullError

FULL = 1 << 20  # bytes free below which a failed write is taken for a full disk (torch's errors do not say so)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error it is removed.

    Works for files and for directories (the caller creates the directory at the yielded path).
    ``suffix`` defaults to the target's own suffix, for writers that choose the format by extension.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a job killed with SIGKILL, which runs no cleanup
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=(path.suffix if suffix is None else suffix) + ".tmp",
                               dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    tmp = Path(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as e:
        full = _disk_full(e, path.parent)
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if full:
            raise DiskFullError(f"no space left on the disk of {path.parent} while writing {path.name}; nothing "
                                "partial was kept. Free space (or set results_dir= to a larger disk) and rerun the "
                                "same command: finished outputs are kept") from e
        raise


def _disk_full(e: BaseException, directory: Path) -> bool:
    """Whether a failed write ran out of space: by errno, by the message of the Rust and C++ writers
    (safetensors, pyarrow), or, for torch's serializer, which only reports a short write, by the free space left."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit
        return False
    if "No space left on device" in str(e) or "os error 28" in str(e):
        return True
    try:
        return shutil.disk_usage(directory).free < FULL
    except OSError:
        return False


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_parquet(df, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_csv(df, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip("."), **kwargs)


def save_tensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
