"""Atomic file writes: a reader sees the old file or the new one, never half of one.

A full disk (or a file size limit) met inside a write becomes one ``DiskFullError`` naming the
file, whatever library was writing (torch, h5py, pyarrow, pandas), and the temporary file is
removed, so the run stays resumable once space is freed.

Test-only fault injection: with ``FOLDSTACK_FAULT_AFTER_WRITES=N`` in the environment the process
kills itself with SIGKILL right after its Nth atomic write, so the fault-injection tests can stop
a run at every write deterministically. Unset (always, outside tests) it costs one dict lookup.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from oof.errors import DiskFullError

log = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)

FAULT_ENV = "FOLDSTACK_FAULT_AFTER_WRITES"
_writes_done = 0
_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# What the libraries say when they hide the errno: torch's zip writer ("file write failed",
# "unexpected pos 737280 vs 737176" when a short write surfaces at the end of the file),
# numpy's short write ("50000 requested and 2484 written"), HDF5 ("errno = 28"/"errno = 27"),
# and the plain strerror texts.
_FULL_TEXT = re.compile(r"no space left on device|file too large|disk quota exceeded|"
                        r"file write failed|unexpected pos \d+ vs \d+|"
                        r"\d+ requested and \d+ written|errno = 2[78]\b")


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) is a full disk or size limit."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, DiskFullError):
            return True
        if isinstance(cur, OSError) and cur.errno in _FULL_ERRNOS:
            return True
        if _FULL_TEXT.search(str(cur).lower()):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def disk_full_error(exc: BaseException, path: str | os.PathLike[str] | None) -> DiskFullError:
    """The one message for a full disk, naming the file being written."""
    if isinstance(exc, DiskFullError):
        return exc
    named = re.search(r"filename = '([^']+)'", str(exc))  # HDF5 names the file in its text
    where = path or getattr(exc, "filename", None) or (named and named.group(1)) or "a file"
    return DiskFullError(
        f"no space left on device while writing {where} ({type(exc).__name__}: {exc}); nothing "
        "half-written was kept: free some space and rerun the same command to resume"
    )


def _count_write(path: Path) -> None:
    """Fault injection for tests (see the module docstring); a no-op unless the env var is set."""
    limit = os.environ.get(FAULT_ENV)
    if not limit:
        return
    global _writes_done
    _writes_done += 1
    if _writes_done == int(limit):
        log.warning("fault injection: SIGKILL after atomic write %d (%s)", _writes_done, path)
        os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(exc, path) from exc
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 files, and a writer may replace the file with one of its own (as
        # safetensors does): give the result the mode a plain open() would have
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    except Exception as exc:
        if is_disk_full(exc):
            raise disk_full_error(exc, path) from exc
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    _count_write(path)


def write_atomic(path: str | os.PathLike[str], writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and move the result to ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    return write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
