# AP leaves the script's random-number streams alone: calibration, planning and engagement draw privately.
import pytest
import torch
from torch import nn

from moreh_ap.planner import microbench
from moreh_ap.planner.private_rng import private_rng

pytestmark = pytest.mark.timeout(300)


def _states() -> list[torch.Tensor]:
    """The global CPU generator's state, and every CUDA device's when CUDA is available."""
    states = [torch.get_rng_state()]
    if torch.cuda.is_available():
        states += list(torch.cuda.get_rng_state_all())
    return states


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def test_private_rng_restores_the_state_also_on_error():
    torch.manual_seed(3)
    before = _states()
    with private_rng():
        torch.randn(10)
    assert _same(before, _states())
    with pytest.raises(ZeroDivisionError), private_rng():
        torch.rand(4)
        raise ZeroDivisionError
    assert _same(before, _states())
    torch.randn(1)
    assert not _same(before, _states())  # the check can fail: a draw outside moves the state


def test_microbenchmarks_leave_the_global_generator_alone(one_thread):
    torch.manual_seed(5)
    before = _states()
    device = torch.device("cpu")
    table, _eff, _floor = microbench.measure_compute(device, sizes=(32,), shape=(32, 2, 8, 1), repeats=1)
    assert set(table) == {"bf16", "fp32"}
    microbench.measure_matmul(device, sizes=(16,), repeats=1)
    microbench.measure_block(device, table, shape=(32, 2, 8, 1), repeats=1)
    assert _same(before, _states())


def test_engagement_in_one_process_leaves_the_global_generator_alone(tmp_path, monkeypatch, one_thread):
    """The script's next draw after its first training step (planning with a fresh calibration, then
    parallelize) is the draw it makes without AP."""
    from moreh_ap.oneline import is_engaged
    from moreh_ap.option import enable_advanced_parallelization

    monkeypatch.chdir(tmp_path)  # engagement writes the .dump file
    monkeypatch.setenv("MOREH_AP_CACHE_DIR", str(tmp_path / "fresh"))

    def first_step(ap: bool) -> torch.Tensor:
        torch.manual_seed(11)
        model = _tiny_llama()  # dropout 0: the step itself draws nothing
        model.train()
        if ap:
            enable_advanced_parallelization(mixed_precision=False)
        opt = torch.optim.AdamW(model.parameters())
        ids = torch.randint(1, 64, (4, 8))  # the script's data, sampled from the global generator
        before = _states()
        model(ids, labels=ids).loss.backward()
        opt.step()
        assert _same(before, _states())
        return torch.randint(0, 10**9, (4,))  # the script's next batch

    plain = first_step(False)
    with_ap = first_step(True)
    assert is_engaged()
    assert any((tmp_path / "fresh").iterdir()), "the calibration DB was not measured: the test checks nothing"
    assert torch.equal(plain, with_ap)


def test_a_model_with_dropout_traces_without_drawing():
    from transformers import GPT2Config, GPT2LMHeadModel

    from moreh_ap.graph.tracing import trace

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    model.train()  # dropout 0.1 everywhere: a real forward would draw
    ids = torch.randint(0, 64, (2, 8))
    before = _states()
    trace(model, (ids,), {"labels": ids})
    assert _same(before, _states())
    nn.Dropout(0.5)(torch.ones(4))  # the same check sees a real draw
    assert not _same(before, _states())
