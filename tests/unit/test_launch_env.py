# The launch identity (moreh_ap's own variables or torchrun's), each self-launched rank's environment and device,
# the process group brought up from our variables, and how AP recognises a script that distributes itself.
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

import moreh_ap
from moreh_ap import launcher, ranks
from moreh_ap.launch_env import rank_env, visible_devices
from moreh_ap.oneline.aside import distributes_itself
from moreh_ap.runtime.dist import created_by_ap, init_distributed

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                 "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


@pytest.fixture
def no_launch_vars(monkeypatch):
    for name in (*TORCHRUN_VARS, *ranks.OWN_VARIABLES.values(), ranks.LAUNCHED_MARK):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def no_group():
    assert not dist.is_initialized()
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_visible_devices_rank_r_gets_the_r_th_visible_device():
    assert visible_devices(2, cuda_visible=None, device_count=4) == ["0", "1"]
    assert visible_devices(4, cuda_visible=None, device_count=4) == ["0", "1", "2", "3"]
    assert visible_devices(2, cuda_visible="3,5", device_count=2) == ["3", "5"]  # the user's own list
    assert visible_devices(2, cuda_visible=" 3, 5 ,7", device_count=3) == ["3", "5"]
    assert visible_devices(2, cuda_visible="GPU-aa,GPU-bb", device_count=2) == ["GPU-aa", "GPU-bb"]
    # fewer devices than ranks: None (the ranks run on CPU, as the launch decision says)
    assert visible_devices(3, cuda_visible="3,5", device_count=2) is None
    assert visible_devices(2, cuda_visible=None, device_count=1) is None
    assert visible_devices(2, cuda_visible="", device_count=0) is None
    assert visible_devices(2, cuda_visible="3,,5", device_count=1) is None  # CUDA stops at the empty entry
    with pytest.raises(ValueError, match="nproc=0"):
        visible_devices(0, cuda_visible=None, device_count=2)


def test_rank_env_has_our_variables_and_none_of_torchruns():
    env = rank_env(1, world=2, port=1234, device="cuda", devices=["3", "5"], environ={}, cpu_count=8)
    assert env == {"MOREH_AP_RANK": "1", "MOREH_AP_WORLD_SIZE": "2", "MOREH_AP_LOCAL_RANK": "1",
                   "MOREH_AP_LOCAL_WORLD_SIZE": "2", "MOREH_AP_MASTER_ADDR": "127.0.0.1",
                   "MOREH_AP_MASTER_PORT": "1234", "MOREH_AP_LAUNCHED": "1", "MOREH_AP_DEVICE": "cuda",
                   "CUDA_VISIBLE_DEVICES": "5"}
    rank0 = rank_env(0, world=2, port=1234, device="cuda", devices=["3", "5"], environ={}, cpu_count=8)
    assert "CUDA_VISIBLE_DEVICES" not in rank0  # rank 0 is this process: its CUDA is up, its device the first
    cpu = rank_env(1, world=2, port=1, device="cpu", devices=None, environ={}, cpu_count=8)
    assert (cpu["GLOO_SOCKET_IFNAME"], cpu["OMP_NUM_THREADS"], cpu["MOREH_AP_DEVICE"]) == ("lo", "4", "cpu")
    own = rank_env(1, world=2, port=1, device="cpu", devices=None, cpu_count=8,
                   environ={"OMP_NUM_THREADS": "2", "GLOO_SOCKET_IFNAME": "eth0"})
    assert "OMP_NUM_THREADS" not in own and "GLOO_SOCKET_IFNAME" not in own  # the user's settings stay
    for env in (env, rank0, cpu, own):
        assert not set(env) & set(TORCHRUN_VARS)


def test_launcher_child_env_uses_a_fake_device_count(monkeypatch):
    """The launcher's own composition: CUDA ranks of a 2-device machine where the user set "3,5"."""
    monkeypatch.setattr(launcher, "_cuda_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    launch = launcher._Launch.__new__(launcher._Launch)
    launch.world, launch.port = 2, 4321
    decision = launcher.decide({"MOREH_AP_NPROC": "2"}, cuda_count=2)
    assert (decision.launch, decision.device) == (True, "cuda")
    assert launch._rank_env(1, decision)["CUDA_VISIBLE_DEVICES"] == "5"
    assert launch._rank_env(1, decision)["MOREH_AP_MASTER_PORT"] == "4321"
    assert "CUDA_VISIBLE_DEVICES" not in launch._rank_env(0, decision)
    cpu = launcher.decide({"MOREH_AP_NPROC": "3"}, cuda_count=2)  # fewer devices than ranks: CPU ranks
    launch.world = 3
    assert cpu.device == "cpu" and "CUDA_VISIBLE_DEVICES" not in launch._rank_env(2, cpu)


def test_identity_from_our_variables_or_torchruns(no_launch_vars, monkeypatch):
    assert ranks.identity() is None and ranks.launch_rank() == 0 and ranks.local_rank() == 0
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    found = ranks.identity()
    assert (found.rank, found.world_size, found.local_rank, found.local_world_size, found.source) == \
        (3, 4, 1, 4, "torchrun")
    assert moreh_ap.launch_rank() == 3 and ranks.local_rank() == 1
    env = {"MOREH_AP_RANK": "1", "MOREH_AP_WORLD_SIZE": "2", "MOREH_AP_MASTER_ADDR": "127.0.0.1",
           "MOREH_AP_MASTER_PORT": "29500"}
    found = ranks.identity(env)
    assert (found.rank, found.world_size, found.local_rank, found.master_port, found.source) == \
        (1, 2, 1, 29500, "moreh_ap")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert moreh_ap.launch_rank() == 1  # ours first
    assert ranks.world_sizes({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}) == (4, 2)  # no rank needed
    assert ranks.world_sizes({}) == (None, None)


def test_identity_rejects_bad_values_naming_the_variable():
    with pytest.raises(ValueError, match="MOREH_AP_RANK=2 is not valid with MOREH_AP_WORLD_SIZE=2"):
        ranks.identity({"MOREH_AP_RANK": "2", "MOREH_AP_WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="torchrun launch variables do not parse"):
        ranks.identity({"RANK": "x", "WORLD_SIZE": "2"})


def test_launch_rank_falls_back_to_the_process_group(no_launch_vars, monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 5)
    assert moreh_ap.launch_rank() == 5


def test_init_distributed_from_our_variables_adds_none_of_torchruns(no_launch_vars, no_group, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # init_distributed sets it for loopback: restored after
    store = launcher.loopback_store(1, timeout_s=10)
    for name, value in {"MOREH_AP_RANK": "0", "MOREH_AP_WORLD_SIZE": "1", "MOREH_AP_MASTER_ADDR": "127.0.0.1",
                        "MOREH_AP_MASTER_PORT": str(store.port)}.items():
        monkeypatch.setenv(name, value)
    assert init_distributed(timeout_s=10) is True
    assert dist.get_world_size() == 1 and created_by_ap()
    assert not set(os.environ) & set(TORCHRUN_VARS)
    model = nn.Linear(2, 2)
    assert distributes_itself(model) is None  # AP's own group: not the script distributing itself
    ddp = nn.parallel.DistributedDataParallel(model)
    assert "wrapped in DistributedDataParallel" in distributes_itself(ddp)
    dist.destroy_process_group()
    assert not created_by_ap()


def test_the_group_ap_made_is_destroyed_at_exit_unless_a_step_failed(no_launch_vars, no_group, monkeypatch,
                                                                     tmp_path):
    """A gloo group left to interpreter finalization can abort a finished rank (exit code -6): AP destroys its own
    group at exit, but not the script's, and not after a failed step (a peer may wait in a collective)."""
    from moreh_ap import faults
    from moreh_ap.runtime import dist as ap_dist

    registered = []
    monkeypatch.setattr(ap_dist.atexit, "register", registered.append)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    store = launcher.loopback_store(1, timeout_s=10)
    for name, value in {"MOREH_AP_RANK": "0", "MOREH_AP_WORLD_SIZE": "1", "MOREH_AP_MASTER_ADDR": "127.0.0.1",
                        "MOREH_AP_MASTER_PORT": str(store.port)}.items():
        monkeypatch.setenv(name, value)
    assert init_distributed(timeout_s=10) is True
    assert registered == [ap_dist.destroy_at_exit]
    monkeypatch.setattr(faults, "known_failure", lambda: object())
    ap_dist.destroy_at_exit()
    assert dist.is_initialized() and created_by_ap()  # a step failed: left to the launcher
    monkeypatch.setattr(faults, "known_failure", lambda: None)
    ap_dist.destroy_at_exit()
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                            timeout=timedelta(seconds=10))
    ap_dist.destroy_at_exit()
    assert dist.is_initialized()  # the script's own group: the script's to destroy
    dist.destroy_process_group()


def test_a_group_the_script_made_or_a_wrapped_model_means_it_distributes_itself(no_group, tmp_path):
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    assert distributes_itself(nn.Linear(2, 2)) is None
    fsdp1 = FullyShardedDataParallel.__new__(FullyShardedDataParallel)  # only its class is asked
    nn.Module.__init__(fsdp1)
    assert "wrapped in FullyShardedDataParallel (FSDP)" in distributes_itself(fsdp1)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                            timeout=timedelta(seconds=10))
    assert not created_by_ap()
    assert "initialized torch.distributed itself (a gloo process group of 1 ranks" in \
        distributes_itself(nn.Linear(2, 2))
    sharded = fully_shard(nn.Sequential(nn.Linear(2, 2)))
    assert "wrapped in fully_shard (FSDP2)" in distributes_itself(sharded)
    assert isinstance(sharded, torch.distributed.fsdp.FSDPModule)
