# Tests of the `moreh-ap` console script's --help and --version.
import subprocess
import sys

import moreh_ap


def test_version_and_help():
    out = subprocess.run([sys.executable, "-m", "moreh_ap.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"moreh-ap {moreh_ap.__version__}"
    out = subprocess.run([sys.executable, "-m", "moreh_ap.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage: moreh-ap" in out.stdout
