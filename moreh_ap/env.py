# The MOREH_* environment variables: parsed and validated in one place.
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

ENABLE = "MOREH_ENABLE_ADVANCED_PARALLELIZATION"
MAX_PARALLEL_COMPILE_THREADS = "MOREH_ADVANCED_PARALLELIZATION_MAX_PARALLEL_COMPILE_THREADS"
DETAILED_LOG = "MOREH_ADVANCED_PARALLELIZATION_DETAILED_LOG"
MEMORY_USAGE_CORRECTION_RATIO = "MOREH_ADVANCED_PARALLELIZATION_MEMORY_USAGE_CORRECTION_RATIO"
NPROC = "MOREH_AP_NPROC"
CACHE_DIR = "MOREH_AP_CACHE_DIR"
DIST_TIMEOUT = "MOREH_AP_DIST_TIMEOUT"
RANK_OUTPUT = "MOREH_AP_RANK_OUTPUT"
EXIT_ON_ERROR = "MOREH_AP_EXIT_ON_ERROR"
LOG_LEVEL = "MOREH_AP_LOG_LEVEL"
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")
"""loguru's level names (MOREH_AP_LOG_LEVEL accepts them in any case)."""
CONFIG = "MOREH_AP_CONFIG"
RANK_OUTPUT_CHOICES = ("rank0", "all")
"""rank0: only rank 0 writes to the console, the self-launched ranks to files; all: every rank on the console."""

ALL_VARIABLES = (
    ENABLE,
    MAX_PARALLEL_COMPILE_THREADS,
    DETAILED_LOG,
    MEMORY_USAGE_CORRECTION_RATIO,
    NPROC,
    CACHE_DIR,
    DIST_TIMEOUT,
    RANK_OUTPUT,
    EXIT_ON_ERROR,
    LOG_LEVEL,
    CONFIG,
)


@dataclass(kw_only=True, slots=True, frozen=True)
class EnvSettings:
    """The MOREH_* environment variables, validated."""

    enable: bool | None = None
    """MOREH_ENABLE_ADVANCED_PARALLELIZATION: True (1), False (0) or None (unset)."""
    max_parallel_compile_threads: int = 16
    """Workers that evaluate planner candidates in parallel (integer >= 1)."""
    detailed_log: int = 0
    """0 = off, 1 = per-candidate table on the console, 2 = written to autoconfig_log.dump."""
    memory_usage_correction_ratio: int = 80
    """Percent of device memory the planner may plan for (1-100)."""
    nproc: int | None = None
    """Local ranks for a plain ``python`` launch (integer >= 1), or None."""
    cache_dir: Path
    """Where the calibration DB is kept."""
    dist_timeout_s: float = 60.0
    """Seconds before a collective with a dead peer fails (MOREH_AP_DIST_TIMEOUT, a number > 0)."""
    rank_output: str = "rank0"
    """Where self-launched ranks print (MOREH_AP_RANK_OUTPUT): 'rank0' = rank 0 on the console, ranks
    1..G-1 to per-rank files; 'all' = every rank on the console."""

    exit_on_error: bool = True
    """MOREH_AP_EXIT_ON_ERROR (0 or 1): accepted for old settings and ignored. A failed step's exception
    always reaches the script on the rank where it happened; the other ranks are stopped."""
    log_level: str = "INFO"
    """MOREH_AP_LOG_LEVEL: a loguru level name (upper case)."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cache_dir"] = str(self.cache_dir)
        return d


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/moreh_ap`` or ``~/.cache/moreh_ap``."""
    environ = os.environ if environ is None else environ
    home = environ.get("HOME") or os.path.expanduser("~")
    base = environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    return Path(base) / "moreh_ap"


def _int(environ: Mapping[str, str], name: str, default, *, lo: int, hi: int | None = None, choices=None):
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    accepted = (
        "one of " + ", ".join(map(str, choices))
        if choices
        else (f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}")
    )
    try:
        value = int(raw.strip(), 10)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not valid: expected {accepted}") from None
    if (choices and value not in choices) or value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name}={raw!r} is not valid: expected {accepted}")
    return value


def _seconds(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name}={raw!r} is not valid: expected a number of seconds > 0")
    return value


def _choice(environ: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    if raw.strip().lower() not in choices:
        raise ValueError(f"{name}={raw!r} is not valid: expected one of {', '.join(choices)}")
    return raw.strip().lower()


def _flag(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    if raw.strip() not in ("0", "1"):
        raise ValueError(f"{name}={raw!r} is not valid: expected 0 (off) or 1 (on)")
    return raw.strip() == "1"


def exit_on_error(environ: Mapping[str, str] | None = None) -> bool:
    """MOREH_AP_EXIT_ON_ERROR, validated (default True). It no longer changes anything: a failed step's exception
    always reaches the script (:mod:`moreh_ap.faults`); a value is still checked so a typo is named.

    Raises:
        ValueError: the value is not 0 or 1; the message names the variable.
    """
    return _flag(os.environ if environ is None else environ, EXIT_ON_ERROR, True)


def log_level(environ: Mapping[str, str] | None = None) -> str:
    """MOREH_AP_LOG_LEVEL, validated and upper-cased (default INFO).

    Raises:
        ValueError: not a loguru level name; the message names the variable and the accepted names.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get(LOG_LEVEL)
    if raw is None or raw.strip() == "":
        return "INFO"
    if raw.strip().upper() not in LOG_LEVELS:
        raise ValueError(f"{LOG_LEVEL}={raw!r} is not valid: expected one of {', '.join(LOG_LEVELS)} (any case)")
    return raw.strip().upper()


def read_env(environ: Mapping[str, str] | None = None) -> EnvSettings:
    """Parse and validate every MOREH_* variable.

    Args:
        environ: the mapping to read (default ``os.environ``).

    Raises:
        ValueError: a variable holds a value it does not accept; the message
            names the variable and the accepted values.
    """
    environ = os.environ if environ is None else environ
    raw_enable = environ.get(ENABLE)
    enable = None
    if raw_enable is not None and raw_enable.strip() != "":
        if raw_enable.strip() not in ("0", "1"):
            raise ValueError(f"{ENABLE}={raw_enable!r} is not valid: expected 0 (off) or 1 (on)")
        enable = raw_enable.strip() == "1"
    cache = environ.get(CACHE_DIR)
    return EnvSettings(
        enable=enable,
        max_parallel_compile_threads=_int(environ, MAX_PARALLEL_COMPILE_THREADS, 16, lo=1),
        detailed_log=_int(environ, DETAILED_LOG, 0, lo=0, hi=2, choices=(0, 1, 2)),
        memory_usage_correction_ratio=_int(environ, MEMORY_USAGE_CORRECTION_RATIO, 80, lo=1, hi=100),
        nproc=_int(environ, NPROC, None, lo=1),
        cache_dir=Path(cache).expanduser() if cache and cache.strip() else default_cache_dir(environ),
        dist_timeout_s=_seconds(environ, DIST_TIMEOUT, 60.0),
        rank_output=_choice(environ, RANK_OUTPUT, "rank0", RANK_OUTPUT_CHOICES),
        exit_on_error=exit_on_error(environ),
        log_level=log_level(environ),
    )
