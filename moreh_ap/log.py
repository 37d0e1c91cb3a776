# The user-facing log: loguru, rank 0 only, in the MoAI seed's format, apart from the user's logger.
"""``moreh_ap.log.logger`` prints lines like::

    [2024-04-15 14:07:02.815] [info] The number of candidates is 30.

It is a loguru logger with its own core and its own sink (stderr), so the
user's ``loguru.logger`` is neither reconfigured nor sent our lines. Only
rank 0 prints (:func:`moreh_ap.ranks.launch_rank`: the launcher's variables, or the initialized process
group).
"""
from __future__ import annotations

import sys

import loguru

from moreh_ap import env as _env
from moreh_ap.ranks import launch_rank

__all__ = ["logger", "current_rank", "format_record"]


def current_rank() -> int:
    """This process's global rank (:func:`moreh_ap.ranks.launch_rank`)."""
    return launch_rank()


def format_record(record) -> str:
    """loguru format function: ``[YYYY-MM-DD HH:MM:SS.mmm] [level] message``."""
    t = record["time"]
    stamp = t.strftime("%Y-%m-%d %H:%M:%S") + f".{t.microsecond // 1000:03d}"
    return f"[{stamp}] [{record['level'].name.lower()}] {{message}}\n{{exception}}"


def _new_logger():
    """A loguru logger with a core of its own (falls back to a bound logger)."""
    try:
        from loguru._logger import Core, Logger

        return Logger(
            core=Core(),
            exception=None,
            depth=0,
            record=False,
            lazy=False,
            colors=False,
            raw=False,
            capture=True,
            patchers=[],
            extra={},
        ), True
    except Exception:  # a loguru without this internal API: share the core, filter by tag
        return loguru.logger.bind(moreh_ap=True), False


def _sink(message) -> None:
    sys.stderr.write(str(message))
    sys.stderr.flush()


def _filter(record) -> bool:
    return current_rank() == 0 and (_own_core or record["extra"].get("moreh_ap", False))


logger, _own_core = _new_logger()


def _level() -> str:
    """MOREH_AP_LOG_LEVEL if valid; an invalid value is reported by ``moreh_ap.env.read_env`` (at enable),
    not at import."""
    try:
        return _env.log_level()
    except ValueError:
        return "INFO"


logger.add(_sink, format=format_record, filter=_filter, level=_level(), colorize=False)
