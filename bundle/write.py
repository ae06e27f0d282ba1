"""Writing a bundle so that a reader never sees half of one.

`staging(out_dir)` hands out a fresh temporary directory beside `out_dir` (same parent, so the same
filesystem) to write every file into; when the block ends without an error the directory is
published under `out_dir` by a rename, and when it raises the temporary directory is removed and an
existing `out_dir` is left as it was. A rename within one filesystem is atomic, so `out_dir` holds
either the complete old bundle or the complete new one. Replacing an existing bundle uses Linux's
`renameat2(RENAME_EXCHANGE)` (both paths swapped in one step); where that is unavailable the old
directory is first renamed aside, so for that moment a reader finds no bundle (and fails on the
missing manifest) rather than a partial one.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the
    platform or filesystem does not offer it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28 / not Linux
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or filesystem without the flag
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish(staged: str | Path, out_dir: str | Path) -> None:
    """Move the complete bundle directory `staged` to `out_dir` (same parent directory), replacing
    what was there; the old bundle is deleted afterwards."""
    staged, out_dir = Path(staged), Path(out_dir)
    if staged.parent.resolve() != out_dir.parent.resolve():
        raise ValueError(f"{staged} must be a sibling of {out_dir} (a rename is atomic only within one directory's filesystem)")
    if not out_dir.exists():
        staged.rename(out_dir)
        return
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise FileExistsError(f"{out_dir} exists and is not a bundle directory; not replacing it")
    if _exchange(staged, out_dir):  # out_dir now holds the new bundle, `staged` the old one
        shutil.rmtree(staged, ignore_errors=True)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-old-", dir=out_dir.parent))
    aside.rmdir()
    out_dir.rename(aside)
    try:
        staged.rename(out_dir)
    except BaseException:
        aside.rename(out_dir)  # put the old bundle back
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def staging(out_dir: str | Path) -> Iterator[Path]:
    """A temporary directory beside `out_dir` to write a bundle into; published as `out_dir` when
    the block finishes, removed (with `out_dir` untouched) when it raises."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        yield tmp
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
