# Environments for the processes tests start: no MOREH_* variable leaks in from the test run.
import os


def clean_subprocess_env(**extra: str) -> dict:
    """os.environ without MOREH_* variables, plus ``extra``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MOREH_")}
    environ.update(extra)
    return environ
