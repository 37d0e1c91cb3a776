# Tests of the start-up hook (.pth): torch.moreh appears with torch, lazily, never breaking Python.
import subprocess
import sys

import pytest

from tests.helpers.env import clean_subprocess_env


def _run(code: str, **environ: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env=clean_subprocess_env(**environ),
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",  # not the repository: only the installed hook is in play
    )


def test_torch_moreh_without_importing_moreh_ap():
    proc = _run("import torch; print(torch.moreh.option.__name__)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "moreh_ap.option"


def test_import_torch_does_not_import_moreh_ap():
    proc = _run("import sys, torch; print('moreh_ap' in sys.modules, hasattr(torch, 'moreh'))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False True"


def test_hook_does_not_import_torch():
    proc = _run("import sys; print('torch' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_env_var_enables_at_torch_import():
    proc = _run(
        "import torch; print(torch.moreh.option.is_advanced_parallelization_enabled())",
        MOREH_ENABLE_ADVANCED_PARALLELIZATION="1",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


@pytest.mark.parametrize("value", ["abc", "", "2", "1 1"])
def test_bad_value_never_breaks_python(value):
    proc = _run("pass", MOREH_ENABLE_ADVANCED_PARALLELIZATION=value)
    assert proc.returncode == 0 and proc.stderr == ""
    proc = _run("import torch; print('ok')", MOREH_ENABLE_ADVANCED_PARALLELIZATION=value)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok"


def test_bad_value_is_reported_when_moreh_is_used():
    proc = _run("import torch; torch.moreh.option", MOREH_ENABLE_ADVANCED_PARALLELIZATION="yes")
    assert proc.returncode != 0
    assert "MOREH_ENABLE_ADVANCED_PARALLELIZATION='yes' is not valid" in proc.stderr


def test_hook_is_idempotent():
    code = (
        "import sys, importlib, _moreh_ap_hook; _moreh_ap_hook.install(); _moreh_ap_hook.install();"
        "print(sum(getattr(f, '_moreh_ap_hook', False) for f in sys.meta_path));"
        "import torch; print(type(torch.moreh).__name__)"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "_LazyMoreh"]


def test_env_only_run_with_a_bad_value_stops_at_the_first_cuda_call():
    """MOREH_ENABLE_ADVANCED_PARALLELIZATION=1 with a bad MOREH_* value: the hook reports it in one line (it
    never raises) and the script's first .cuda() or optimizer raises it, naming the variable."""
    code = "import torch; print('imported', flush=True); torch.nn.Linear(2, 2).cuda(); print('trained')"
    proc = _run(code, MOREH_ENABLE_ADVANCED_PARALLELIZATION="1", MOREH_AP_CONFIG="{not json")
    assert proc.returncode != 0 and proc.stdout.split() == ["imported"]
    assert "start-up hook could not enable advanced parallelization" in proc.stderr
    assert ("ValueError: advanced parallelization was requested by MOREH_ENABLE_ADVANCED_PARALLELIZATION=1 but "
            "cannot start: MOREH_AP_CONFIG='{not json' is not valid") in proc.stderr
    proc = _run("import torch; torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)",
                MOREH_ENABLE_ADVANCED_PARALLELIZATION="1", MOREH_AP_EXIT_ON_ERROR="yes")
    assert proc.returncode != 0 and "MOREH_AP_EXIT_ON_ERROR='yes' is not valid" in proc.stderr.splitlines()[-1]
