# moreh_ap's own files: atomic text writes that never follow a symlink, pruning of per-launch log directories.
"""Writing the files moreh_ap leaves in the working directory and its cache.

:func:`write_text` writes a temporary file in the target's directory and renames it over the target
(``os.replace``): a reader never sees half a file, and a symlink planted at the target's name is
replaced by the new file (its target is not touched). A directory that cannot be written (read-only
working directory) gives one warning per file name, not an exception.

:func:`prune_log_dirs` keeps the newest per-launch log directories under ``MOREH_AP_CACHE_DIR/logs``
and never removes the directory of a launcher that is still alive.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from moreh_ap.log import logger

__all__ = ["write_text", "prune_log_dirs", "KEEP_LOG_DIRS", "launcher_pid"]

KEEP_LOG_DIRS = 20
"""Per-launch log directories kept under ``<cache>/logs`` (the newest; live launchers' are always kept)."""

_warned: set[str] = set()


def write_text(path: str | os.PathLike, text: str) -> bool:
    """Write ``text`` to ``path`` atomically (temporary file + ``os.replace`` in the same directory).

    A symlink at ``path`` is replaced, never followed. When the directory cannot be written, one
    warning per path is logged and nothing is raised.

    Returns:
        True when the file was written.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        return True
    except OSError as exc:
        if tmp is not None and os.path.lexists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass
        key = str(path.absolute())
        if key not in _warned:
            _warned.add(key)
            logger.warning(f"moreh_ap could not write {path} ({exc.strerror or exc}); training goes on without it.")
        return False


def launcher_pid(name: str) -> int | None:
    """The pid in a log directory's name ``<date>-<time>-<pid>`` (None when the name has no pid)."""
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def prune_log_dirs(root: str | os.PathLike, *, keep: int = KEEP_LOG_DIRS, exclude: str | None = None) -> list[str]:
    """Remove all but the ``keep`` newest log directories under ``root`` (by name: they start with the
    launch time); a directory whose launcher process is alive, and ``exclude``, are never removed.

    Returns:
        The directories removed.
    """
    root = Path(root)
    try:
        entries = sorted((e for e in root.iterdir() if e.is_dir() and not e.is_symlink()), key=lambda e: e.name)
    except OSError:
        return []
    removed = []
    for entry in entries[:max(len(entries) - keep, 0)]:
        pid = launcher_pid(entry.name)
        if (exclude is not None and entry.name == Path(exclude).name) or (pid is not None and _alive(pid)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(str(entry))
    return removed
