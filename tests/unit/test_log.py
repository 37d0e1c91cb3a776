# Tests of moreh_ap.log: the seed's format, rank 0 only, and the user's loguru left alone.
import re

import pytest

from loguru import logger as user_logger

from moreh_ap.log import logger

LINE = re.compile(r"^\[\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3}\] \[info\] The number of candidates is 30\.$")


def test_seed_format_on_stderr(capsys):
    logger.info("The number of candidates is 30.")
    err = capsys.readouterr().err.strip().splitlines()
    assert any(LINE.match(line) for line in err), err


@pytest.mark.parametrize("rank_var,world_var", [("RANK", "WORLD_SIZE"), ("MOREH_AP_RANK", "MOREH_AP_WORLD_SIZE")])
def test_only_rank_zero_prints(capsys, monkeypatch, rank_var, world_var):
    """The rank comes from torchrun's variables or the self-launcher's own."""
    monkeypatch.setenv(world_var, "2")
    monkeypatch.setenv(rank_var, "1")
    logger.info("from rank one")
    assert "from rank one" not in capsys.readouterr().err
    monkeypatch.setenv(rank_var, "0")
    logger.warning("from rank zero")
    assert "[warning] from rank zero" in capsys.readouterr().err


def test_user_logger_untouched():
    seen = []
    handler = user_logger.add(seen.append, format="{message}")
    try:
        logger.info("ours")
        user_logger.info("theirs")
    finally:
        user_logger.remove(handler)
    assert [str(m).strip() for m in seen] == ["theirs"]


def test_braces_in_messages_are_safe(capsys):
    logger.info("dict {'a': 1}")
    assert "dict {'a': 1}" in capsys.readouterr().err
