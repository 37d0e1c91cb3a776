# Writes happen once, in one process: the guards as rank 1 sees them (rank faked), the library's calls, restore.
import io

import pytest
import torch
from torch import nn

from moreh_ap.oneline import writes
from moreh_ap.oneline.state import STATE, Internal
from moreh_ap.option import disable_advanced_parallelization, enable_advanced_parallelization

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def as_rank(monkeypatch):
    """Hooks installed, AP marked engaged, and this process seen as the given rank."""
    enable_advanced_parallelization()

    def set_rank(r: int) -> None:
        monkeypatch.setattr(writes, "rank", lambda: r)
        STATE.engaged = True

    yield set_rank
    STATE.engaged = False
    disable_advanced_parallelization()


def test_torch_and_safetensors_saves_write_on_rank_zero_only(as_rank, tmp_path):
    from safetensors.torch import load_file, save_file, save_model

    t = {"w": torch.ones(2)}
    as_rank(1)
    assert torch.save(t, tmp_path / "a.pt") is None and not (tmp_path / "a.pt").exists()
    with open(tmp_path / "b.pt", "wb") as f:  # the script's open() creates the file; torch.save adds nothing
        torch.save(t, f)
    assert (tmp_path / "b.pt").stat().st_size == 0
    buf = io.BytesIO()
    torch.save(t, buf)  # in memory: not a file write, kept
    assert torch.equal(torch.load(io.BytesIO(buf.getvalue()))["w"], t["w"])
    torch.save(t, f=io.BytesIO())
    import safetensors.torch as st

    save_file(t, str(tmp_path / "c.safetensors"))
    st.save_model(nn.Linear(2, 2), str(tmp_path / "d.safetensors"))
    assert not (tmp_path / "c.safetensors").exists() and not (tmp_path / "d.safetensors").exists()
    with Internal():  # the library's own saves are never dropped
        torch.save(t, tmp_path / "lib.pt")
    assert (tmp_path / "lib.pt").exists()
    as_rank(0)
    torch.save(t, tmp_path / "a.pt")
    st.save_file(t, str(tmp_path / "c.safetensors"))
    assert torch.equal(torch.load(tmp_path / "a.pt")["w"], t["w"])
    assert torch.equal(load_file(str(tmp_path / "c.safetensors"))["w"], t["w"])


def test_before_engagement_every_rank_writes(as_rank, tmp_path, monkeypatch):
    monkeypatch.setattr(writes, "rank", lambda: 1)
    assert not STATE.engaged
    torch.save(torch.ones(1), tmp_path / "e.pt")
    assert (tmp_path / "e.pt").exists()


def test_hugging_face_writes_on_rank_zero_only(as_rank, tmp_path, monkeypatch):
    import transformers.trainer as hf_trainer
    from transformers import GPT2Config, TrainerState

    monkeypatch.setattr(writes, "engaged_model", lambda: None)  # not an HF root: transformers' frames decide
    as_rank(1)
    writes.patch_library_writes()
    assert "hf_writes" not in STATE.originals  # this test's frames are not transformers' code
    monkeypatch.setattr(writes, "_called_from_transformers", lambda: True)  # as under the Trainer's loop
    original_rotate = hf_trainer.rotate_checkpoints
    writes.patch_library_writes()
    assert hf_trainer.rotate_checkpoints is not original_rotate

    TrainerState(global_step=3).save_to_json(str(tmp_path / "trainer_state.json"))
    GPT2Config(n_layer=1).save_pretrained(str(tmp_path / "config"))
    for step in (1, 2):
        (tmp_path / "run" / f"checkpoint-{step}").mkdir(parents=True)
    hf_trainer.rotate_checkpoints(output_dir=str(tmp_path / "run"), save_total_limit=1)
    assert not (tmp_path / "trainer_state.json").exists() and not (tmp_path / "config").exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert hf_trainer.Trainer.is_world_process_zero(None) is False
    as_rank(0)
    assert hf_trainer.Trainer.is_world_process_zero(None) is True
    TrainerState(global_step=3).save_to_json(str(tmp_path / "trainer_state.json"))
    hf_trainer.rotate_checkpoints(output_dir=str(tmp_path / "run"), save_total_limit=1)
    assert (tmp_path / "trainer_state.json").exists()
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["checkpoint-2"]
    disable_advanced_parallelization()
    assert hf_trainer.rotate_checkpoints is original_rotate
    assert "hf_writes" not in STATE.originals


def test_restored_at_uninstall():
    import safetensors.torch as st

    save, save_file = torch.save, st.save_file
    enable_advanced_parallelization()
    assert torch.save is not save and st.save_file is not save_file
    disable_advanced_parallelization()
    assert torch.save is save and st.save_file is save_file
