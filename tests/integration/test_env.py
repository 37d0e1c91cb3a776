# Tests of moreh_ap.env: every MOREH_* variable, good and bad values.
import subprocess
import sys
from pathlib import Path

import pytest

from moreh_ap import env
from tests.helpers.env import clean_subprocess_env


def test_defaults(tmp_path):
    s = env.read_env({"HOME": str(tmp_path)})
    assert s.enable is None
    assert (s.max_parallel_compile_threads, s.detailed_log, s.memory_usage_correction_ratio) == (16, 0, 80)
    assert s.nproc is None
    assert s.cache_dir == tmp_path / ".cache" / "moreh_ap"
    assert env.read_env({"XDG_CACHE_HOME": str(tmp_path)}).cache_dir == tmp_path / "moreh_ap"
    assert set(s.to_dict()) >= {"enable", "nproc", "cache_dir"}


def test_good_values(tmp_path):
    s = env.read_env(
        {
            env.ENABLE: "1",
            env.MAX_PARALLEL_COMPILE_THREADS: "4",
            env.DETAILED_LOG: "2",
            env.MEMORY_USAGE_CORRECTION_RATIO: "100",
            env.NPROC: "2",
            env.CACHE_DIR: str(tmp_path),
        }
    )
    assert (s.enable, s.max_parallel_compile_threads, s.detailed_log) == (True, 4, 2)
    assert (s.memory_usage_correction_ratio, s.nproc, s.cache_dir) == (100, 2, Path(tmp_path))
    assert env.read_env({env.ENABLE: "0"}).enable is False
    assert env.read_env({env.DIST_TIMEOUT: "2.5"}).dist_timeout_s == 2.5
    assert env.read_env({}).dist_timeout_s == 60.0
    assert env.read_env({}).rank_output == "rank0"
    assert env.read_env({env.RANK_OUTPUT: "all"}).rank_output == "all"
    assert env.read_env({env.RANK_OUTPUT: " Rank0 "}).rank_output == "rank0"


@pytest.mark.parametrize(
    "name, value, accepted",
    [
        (env.ENABLE, "true", "0 (off) or 1 (on)"),
        (env.ENABLE, "2", "0 (off) or 1 (on)"),
        (env.MAX_PARALLEL_COMPILE_THREADS, "0", "an integer >= 1"),
        (env.MAX_PARALLEL_COMPILE_THREADS, "many", "an integer >= 1"),
        (env.DETAILED_LOG, "3", "one of 0, 1, 2"),
        (env.MEMORY_USAGE_CORRECTION_RATIO, "0", "an integer from 1 to 100"),
        (env.MEMORY_USAGE_CORRECTION_RATIO, "101", "an integer from 1 to 100"),
        (env.MEMORY_USAGE_CORRECTION_RATIO, "80.5", "an integer from 1 to 100"),
        (env.NPROC, "0", "an integer >= 1"),
        (env.NPROC, "two", "an integer >= 1"),
        (env.DIST_TIMEOUT, "0", "a number of seconds > 0"),
        (env.DIST_TIMEOUT, "soon", "a number of seconds > 0"),
        (env.DIST_TIMEOUT, "nan", "a number of seconds > 0"),
        (env.RANK_OUTPUT, "none", "one of rank0, all"),
        (env.RANK_OUTPUT, "1", "one of rank0, all"),
    ],
)
def test_bad_values_name_the_variable(name, value, accepted):
    with pytest.raises(ValueError) as info:
        env.read_env({name: value})
    assert name in str(info.value) and accepted in str(info.value) and repr(value) in str(info.value)


def test_bad_value_fails_at_import():
    proc = subprocess.run(
        [sys.executable, "-c", "import moreh_ap"],
        env=clean_subprocess_env(MOREH_AP_NPROC="zero"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "ValueError: MOREH_AP_NPROC='zero' is not valid" in proc.stderr
