# Where the repository and the test helpers are, for tests that start processes or read files.
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The repository's root (the working directory of the processes the tests start)."""
HELPERS = Path(__file__).resolve().parent
"""tests/helpers/ (scripts the tests run as files live here)."""
