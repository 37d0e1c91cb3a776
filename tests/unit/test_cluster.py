# Tests for moreh_ap.planner.cluster and the calibration DB (cache, corrupt files, analytic fallback).
import json

import pytest
import torch

from moreh_ap.planner import calibration as cal
from moreh_ap.planner import calibration_db as cdb
from moreh_ap.planner import microbench as mb
from moreh_ap.planner import time_model as tm
from moreh_ap.planner.cluster import PRESETS, Cluster

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_thread")]
TINY_BLOCK = (32, 2, 16, 1)  # reference block for the block-efficiency measurement: fast in tests


def test_presets_and_errors():
    for name in ("a100-40gb", "a100-80gb", "h100-80gb", "h200", "moreh-64gb", "cpu"):
        assert name in PRESETS
        c = Cluster.preset(name, nodes=2, devices_per_node=4)
        assert c.world_size == 8 and c.device_memory > 0 and c.flops("bf16") > 0
    assert Cluster.preset("moreh-64gb").device_memory == 68_702_699_520
    with pytest.raises(ValueError, match="a100-40gb"):
        Cluster.preset("tpu")
    with pytest.raises(ValueError, match="nodes"):
        Cluster.preset("h200", nodes=0)
    with pytest.raises(TypeError, match="peak_flops"):
        Cluster(nodes=1, devices_per_node=1, device_memory=1, peak_flops=5.0, mem_bandwidth=1,
                intra_node_bandwidth=1, inter_node_bandwidth=1)


def test_detect_on_cpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    c = Cluster.detect()
    assert (c.nodes, c.devices_per_node, c.device_type) == (2, 2, "cpu")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv("MOREH_AP_NPROC", raising=False)
    assert Cluster.detect().world_size == 1


def test_detect_follows_the_rank_device_on_a_cuda_machine(monkeypatch):
    """On a (faked) 2-GPU machine: the CUDA device's preset and memory, devices per node from the GPUs; with
    MOREH_AP_DEVICE=cpu (CPU ranks on a GPU machine, as the suite runs) the cpu preset and no GPU count."""
    props = type("Props", (), {"name": "NVIDIA H100 80GB HBM3", "total_memory": 80 * 2**30})()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "MOREH_AP_NPROC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MOREH_AP_DEVICE")
    c = Cluster.detect()
    assert (c.device_type, c.world_size, c.devices_per_node, c.device_memory) == ("cuda", 2, 2, 80 * 2**30)
    assert c.name == props.name
    monkeypatch.setenv("MOREH_AP_DEVICE", "cpu")
    c = Cluster.detect()
    assert (c.device_type, c.world_size) == ("cpu", 1)


def _log_lines(capsys):
    return capsys.readouterr().err


def test_calibration_measured_cached_and_reloaded(tmp_path, capsys):
    c = Cluster.preset("cpu")
    db = cal.load_or_measure(c, cache_dir=tmp_path, matmul_sizes=(32, 64), block_shape=TINY_BLOCK)
    err = _log_lines(capsys)
    assert "analytic ring model" in err and "Calibration DB measured" in err
    assert db.matmul_flops("bf16") > 0 and db.matmul_flops("fp32") > 0 and db.collectives is None
    saved = json.loads((tmp_path / cdb.FILENAME).read_text())
    assert saved["format"] == cdb.FILE_FORMAT and list(saved["entries"]) == [cdb.entry_key(db.fingerprint)]
    again = cal.load_or_measure(c, cache_dir=tmp_path, matmul_sizes=(32, 64), block_shape=TINY_BLOCK)
    assert "Got DBs from backend for auto config." in _log_lines(capsys)
    assert again.source == "cache" and again.matmul == db.matmul


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "other"}), json.dumps([1, 2])])
def test_corrupt_cache_is_remeasured(tmp_path, capsys, content):
    (tmp_path / cdb.FILENAME).write_text(content)
    db = cal.load_or_measure(Cluster.preset("cpu"), cache_dir=tmp_path, matmul_sizes=(32,), block_shape=TINY_BLOCK)
    err = _log_lines(capsys)
    assert "unreadable" in err and "measuring it again" in err
    assert db.source == "measured"
    assert json.loads((tmp_path / cdb.FILENAME).read_text())["format"] == cdb.FILE_FORMAT
    assert cal.load_or_measure(Cluster.preset("cpu"), cache_dir=tmp_path, matmul_sizes=(32,), block_shape=TINY_BLOCK).source == "cache"


@pytest.mark.parametrize("entry", [{"format": "other"}, {"format": cdb.FORMAT, "matmul": {"fp32": [[64, -1]]}}, 7])
def test_corrupt_entry_is_remeasured_and_replaced(tmp_path, capsys, entry):
    key = cdb.entry_key(cal.fingerprint(Cluster.preset("cpu")))
    (tmp_path / cdb.FILENAME).write_text(json.dumps({"format": cdb.FILE_FORMAT, "entries": {key: entry}}))
    db = cal.load_or_measure(Cluster.preset("cpu"), cache_dir=tmp_path, matmul_sizes=(32,), block_shape=TINY_BLOCK)
    assert "unreadable" in _log_lines(capsys) and db.source == "measured"
    assert cal.load_or_measure(Cluster.preset("cpu"), cache_dir=tmp_path, matmul_sizes=(32,), block_shape=TINY_BLOCK).source == "cache"


def test_other_device_entry_is_kept_not_warned(tmp_path, capsys):
    c = Cluster.preset("cpu")
    db = cal.load_or_measure(c, cache_dir=tmp_path, matmul_sizes=(32,), block_shape=TINY_BLOCK)
    other = cdb.CalibrationDB.from_dict(dict(db.to_dict(), fingerprint=dict(db.fingerprint, device="some-other-gpu")))
    other_key = cdb.entry_key(other.fingerprint)
    (tmp_path / cdb.FILENAME).write_text(json.dumps({"format": cdb.FILE_FORMAT,
                                                     "entries": {other_key: other.to_dict()}}))
    capsys.readouterr()
    assert cal.load_or_measure(c, cache_dir=tmp_path, matmul_sizes=(32,), block_shape=TINY_BLOCK).source == "measured"
    err = _log_lines(capsys)
    assert "no entry for" in err and "[warning]" not in err
    assert set(json.loads((tmp_path / cdb.FILENAME).read_text())["entries"]) == {other_key, cdb.entry_key(db.fingerprint)}


def test_old_single_db_file_is_read(tmp_path):
    c = Cluster.preset("cpu")
    db = cdb.CalibrationDB(fingerprint=cal.fingerprint(c), matmul={"fp32": [[64.0, 3e9]]})
    (tmp_path / cdb.FILENAME).write_text(json.dumps(db.to_dict()))  # format 1: one DB, no entries
    assert cal.load_or_measure(c, cache_dir=tmp_path).matmul == db.matmul


def test_entries_per_world_size_coexist(tmp_path, capsys):
    """A DB measured without a process group and one measured on 2 ranks live side by side in one file."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group is already up")
    kw = dict(cache_dir=tmp_path, matmul_sizes=(32,), collective_sizes=(4096,), block_shape=TINY_BLOCK)
    single = cal.load_or_measure(Cluster.preset("cpu"), **kw)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)  # a 2-rank group in one process
    try:
        two = cal.load_or_measure(Cluster.preset("cpu", devices_per_node=2), **kw)
        assert two.source == "measured" and two.collective_world == 2 and "send_recv" in two.collectives
        capsys.readouterr()
        again_two = cal.load_or_measure(Cluster.preset("cpu", devices_per_node=2), **kw)
    finally:
        dist.destroy_process_group()
    again_single = cal.load_or_measure(Cluster.preset("cpu"), **kw)
    err = _log_lines(capsys)
    assert (again_two.source, again_single.source) == ("cache", "cache")
    assert err.count("Got DBs from backend for auto config.") == 2 and "measured in" not in err
    assert again_two.collectives == two.collectives and again_single.matmul == single.matmul
    assert single.fingerprint["world"] == 0 and two.fingerprint["world"] == 2
    assert len(json.loads((tmp_path / cdb.FILENAME).read_text())["entries"]) == 2


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MOREH_AP_CACHE_DIR", str(tmp_path / "c"))
    cal.load_or_measure(Cluster.preset("cpu"), matmul_sizes=(16,), block_shape=TINY_BLOCK)
    assert (tmp_path / "c" / cdb.FILENAME).exists()


def test_collective_time_analytic_and_calibrated():
    c = Cluster.preset("h100-80gb", nodes=2, devices_per_node=8)
    t_ar = tm.collective_time(c, "all_reduce", 1e9, group=8, inter_node=False)
    t_ag = tm.collective_time(c, "all_gather", 1e9, group=8, inter_node=False)
    assert t_ar == pytest.approx(2 * t_ag, rel=0.02)  # ring all-reduce: 2(n-1) latencies; all-gather: log2(n)
    assert tm.collective_time(c, "all_reduce", 1e9, group=16, inter_node=True) > t_ar
    assert tm.collective_time(c, "all_reduce", 1e9, group=1, inter_node=False) == 0.0
    with pytest.raises(ValueError, match="all_reduce"):
        tm.collective_time(c, "broadcast", 1, group=2, inter_node=False)
    # a calibrated table wins over the bandwidths: all-gather slower than all-reduce, as on gloo
    db = cdb.CalibrationDB(fingerprint={}, matmul={"bf16": [[512, 8e11]]}, collective_world=2,
                           collectives={"all_reduce": [[2**20, 0.002], [2**24, 0.015]],
                                        "all_gather": [[2**20, 0.006], [2**24, 0.116]]}, source="injected")
    cpu = Cluster.preset("cpu", devices_per_node=2)
    cpu.calibration = db
    assert tm.collective_time(cpu, "all_reduce", 2**24, group=2, inter_node=False) == pytest.approx(0.015)
    assert tm.collective_time(cpu, "all_gather", 2**24, group=2, inter_node=False) == pytest.approx(0.116)
    assert tm.collective_time(cpu, "all_gather", 2**25, group=2, inter_node=False) > 0.116
    assert tm.matmul_flops(cpu, "bf16") == 8e11
    assert tm.matmul_flops(cpu, "fp32") == cpu.flops("fp32") * cpu.compute_efficiency


def test_db_round_trip_and_validation():
    db = cdb.CalibrationDB(fingerprint={"a": 1}, matmul={"fp32": [[64.0, 1e9]]},
                           collectives={"send_recv": [[1024.0, 1e-4]]}, collective_world=2)
    assert cdb.CalibrationDB.from_dict(json.loads(json.dumps(db.to_dict()))).collectives == db.collectives
    bad = db.to_dict()
    bad["matmul"] = {"fp32": [[64, -1]]}
    with pytest.raises(ValueError):
        cdb.CalibrationDB.from_dict(bad)


def test_measure_collectives_with_a_process_group(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already up")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        table = mb.measure_collectives(torch.device("cpu"), sizes=(4096,), repeats=1)
    finally:
        dist.destroy_process_group()
    assert set(table) == {"all_reduce", "all_gather", "reduce_scatter"}  # send/recv needs 2 ranks
    assert all(len(v) == 1 and v[0][1] > 0 for v in table.values())
