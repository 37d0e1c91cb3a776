# moreh_ap's files: atomic writes that never follow a symlink, one warning for a read-only directory, the
# calibration lock's bounded wait, pruning of per-launch log directories.
import fcntl
import os
import subprocess
import sys
import time

import pytest

from moreh_ap import files
from moreh_ap.planner import calibration_db as cdb

pytestmark = pytest.mark.timeout(60)


def test_write_is_atomic_and_replaces_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    dump = tmp_path / "advanced_parallelization_selected_config.dump"
    dump.symlink_to(victim)
    assert files.write_text(dump, "num_stages : 1\n")
    assert victim.read_text() == "precious\n"  # the symlink's target is untouched
    assert not dump.is_symlink() and dump.read_text() == "num_stages : 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [dump.name, "victim.txt"]  # no temporary file left


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_gives_one_warning(tmp_path, capfd):
    tmp_path.chmod(0o555)
    try:
        for _ in range(3):
            assert not files.write_text(tmp_path / "autoconfig_log.dump", "x\n")
    finally:
        tmp_path.chmod(0o755)
    assert capfd.readouterr().err.count("could not write") == 1


def test_unwritable_directory_gives_one_warning(tmp_path, capfd):
    """As root (no read-only directory stops root), a path whose directory is a file stands in for it."""
    (tmp_path / "file").write_text("")
    for _ in range(3):
        assert not files.write_text(tmp_path / "file" / "advanced_parallelization_selected_config.dump", "x\n")
    err = capfd.readouterr().err
    assert err.count("[warning] moreh_ap could not write") == 1 and "training goes on without it" in err


def test_calibration_lock_wait_is_bounded(tmp_path, capfd):
    path = tmp_path / "calibration.json"
    db = cdb.CalibrationDB(fingerprint={"k": 1}, source="injected")
    with open(tmp_path / "calibration.json.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another open file description: a held lock for write_entry
        t0 = time.monotonic()
        assert cdb.write_entry(path, db, lock_timeout_s=0.3) is False
        waited = time.monotonic() - t0
    assert 0.3 <= waited < 2.0
    assert "is held by another process after 0.3 s of waiting" in capfd.readouterr().err
    assert not path.exists()
    assert cdb.write_entry(path, db, lock_timeout_s=0.3) is True and path.exists()


def test_log_dirs_are_pruned_but_never_a_live_launchers(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
        names = [f"20260101-0000{i:02d}-{dead}" for i in range(24)]
        names[0] = f"20260101-000000-{live.pid}"  # the oldest, but its launcher is alive
        for n in names:
            (tmp_path / n).mkdir()
        removed = files.prune_log_dirs(tmp_path, keep=20, exclude=str(tmp_path / names[1]))
    finally:
        live.kill()
        live.wait()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert sorted(os.path.basename(r) for r in removed) == names[2:4]
    assert left == sorted([names[0], names[1], *names[4:]])
