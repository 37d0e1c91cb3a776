# Single-process runtime tests: API errors, adapters and stage names, global norm, the covering set itself.
from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch import nn

import moreh_ap
from tests.helpers.runtime_cases import (DIMENSIONS, N_BLOCKS, all_valid_combos, build_model, case_batches, combo_config,
                            covering_combos, loss_fn_for, parallel_run, reference_run)
from moreh_ap.config import ParallelConfig
from moreh_ap.layout import stage_ranges
from moreh_ap.models import find_adapter, map_stage_names, param_names

pytestmark = pytest.mark.timeout(120)


def _one(**kw) -> ParallelConfig:
    kw.setdefault("num_stages", 1)
    kw.setdefault("num_micro_batches", 2)
    kw.setdefault("batch_per_device", 2)
    kw.setdefault("mixed_precision", False)
    return ParallelConfig(**kw)


def test_exports():
    assert moreh_ap.parallelize is moreh_ap.runtime.parallelize
    assert moreh_ap.clip_grad_norm_ is moreh_ap.runtime.clip_grad_norm_
    assert callable(moreh_ap.runtime.global_norm) and callable(moreh_ap.runtime.init_distributed)
    assert moreh_ap.runtime.init_distributed() is False  # no env vars, no process group: a single process


@pytest.mark.parametrize("kind", ["mlp", "gpt", "llama", "gpt2"])
def test_single_process_matches_plain_training(kind):
    """world 1 (no process group): micro-batching and loss semantics alone equal plain training."""
    case = {"id": kind, "model": kind, "cfg": _one(num_micro_batches=2).to_dict(), "padding": kind == "llama"}
    got, ref = parallel_run(case, 1, 0), reference_run(case, 4)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-6)
    for k, v in ref["state"].items():
        torch.testing.assert_close(got["state"][k], v, rtol=1e-5, atol=1e-6)


def test_hf_style_call_returns_loss_and_backward_is_harmless():
    model = build_model("gpt2", 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pm = moreh_ap.parallelize(model, _one(), optimizer=opt)
    batch = case_batches({"model": "gpt2"}, 4)[0]
    out = pm(**batch["kwargs"])
    out.loss.backward()
    assert out.loss.shape == () and torch.isfinite(out.loss) and out[0] is out.loss
    assert all(p.grad is not None for p in pm.parameters())


def test_backward_seed_scales_the_gradients_not_the_loss():
    """``backward_seed(s)`` (a loss scale) leaves s x the gradients and the same loss; bad seeds are errors."""
    batch = case_batches({"model": "gpt2"}, 4)[0]
    runs = []
    for seed in (1.0, 1024.0):
        pm = moreh_ap.parallelize(build_model("gpt2", 0), _one())
        with pm.backward_seed(seed):
            loss = pm.train_step(**batch["kwargs"])
        runs.append((loss, [p.grad.clone() for p in pm.parameters()]))
        assert pm._runner.grad_seed == 1.0  # restored after the block
    (loss1, grads1), (loss2, grads2) = runs
    assert torch.equal(loss1, loss2)
    for g1, g2 in zip(grads1, grads2):
        torch.testing.assert_close(g2, g1 * 1024.0, rtol=1e-6, atol=0.0)  # a power of two: exact up to rounding
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="backward_seed"):
            with pm.backward_seed(bad):
                pass


def test_bad_input_raises_clear_errors():
    model = build_model("mlp", 0)
    with pytest.raises(ValueError, match=r"tp\(2\)"):
        moreh_ap.parallelize(model, _one(tp=2))  # world 1 cannot hold 2 tensor-parallel ranks
    with pytest.raises(ValueError, match=r"num_stages\(2\)"):
        moreh_ap.parallelize(model, _one(num_stages=2))  # world 1 cannot hold 2 stages
    with pytest.raises(TypeError, match="ParallelConfig"):
        moreh_ap.parallelize(model, {"num_stages": 1})
    with pytest.raises(TypeError, match="nn.Module"):
        moreh_ap.parallelize(object(), _one())
    pm = moreh_ap.parallelize(build_model("mlp", 0), _one())
    with pytest.raises(ValueError, match="loss_fn"):
        pm.train_step(torch.randn(4, 16))
    pm = moreh_ap.parallelize(build_model("mlp", 0), _one(num_micro_batches=4), loss_fn=loss_fn_for("mlp"))
    pm.train_step(torch.randn(6, 16), target=torch.randn(6, 8))  # 6 samples: 3 micro-batches of 2, not 4
    with pytest.raises(ValueError, match="max_norm"):
        moreh_ap.clip_grad_norm_(pm, -1.0)


def test_unknown_model_falls_back_to_one_stage_with_a_warning():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    with pytest.warns(UserWarning, match="no pipeline split"):
        pm = moreh_ap.parallelize(Odd(), ParallelConfig(num_stages=2, num_micro_batches=2, batch_per_device=1),
                                  loss_fn=nn.functional.mse_loss)
    assert pm.config.num_stages == 1
    assert torch.isfinite(pm.train_step(torch.randn(4, 4), target=torch.randn(4, 2)))


def test_optimizer_rebinding_keeps_groups_and_hyperparameters():
    model = build_model("gpt", 0)
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4)
    moreh_ap.parallelize(model, _one(), optimizer=opt, loss_fn=loss_fn_for("gpt"))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [len(decay), len(no_decay)]
    assert all(g["lr"] == 3e-4 for g in opt.param_groups)


@pytest.mark.parametrize("kind", ["mlp", "gpt", "llama", "gpt2"])
def test_adapters_split_into_stages_that_keep_original_names(kind):
    model = build_model(kind, 0)
    adapter = find_adapter(model)
    assert len(adapter.blocks()) == N_BLOCKS
    ids = param_names(model)
    ranges = stage_ranges(N_BLOCKS, 4, None)
    assert ranges == [(0, 2), (2, 4), (4, 6), (6, 8)]
    names = set()
    for s, (lo, hi) in enumerate(ranges):
        stage, container = adapter.build_stage(lo, hi, first=s == 0, last=s == 3)
        assert len(list(container.children())) == hi - lo
        for orig in map_stage_names(stage, ids).values():
            names.update(orig)
    expected = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    assert expected <= names  # every parameter (tied ones under both names) lives on some stage


def test_stage_forward_chain_equals_model_forward():
    for kind in ("gpt", "llama", "gpt2", "mlp"):
        model = build_model(kind, 0).eval()
        adapter = find_adapter(model)
        batch = case_batches({"model": kind}, 2)[0]
        x = batch["args"][0] if batch["args"] else batch["kwargs"]["input_ids"]
        full = model(x)
        full = full.logits if hasattr(full, "logits") else full
        h = x
        for s, (lo, hi) in enumerate(stage_ranges(N_BLOCKS, 3, (2, 5))):
            stage, _ = adapter.build_stage(lo, hi, first=s == 0, last=s == 2)
            h = stage(h)
        torch.testing.assert_close(h, full, rtol=1e-5, atol=1e-6)


def test_global_norm_and_clip_single_process():
    ts = [torch.randn(3, 4), torch.randn(5)]
    expect = torch.linalg.vector_norm(torch.cat([t.flatten() for t in ts]))
    torch.testing.assert_close(moreh_ap.runtime.global_norm(ts), expect)
    a = [nn.Parameter(torch.randn(10)) for _ in range(3)]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn(10)
        q.grad = p.grad.clone()
    n1 = moreh_ap.clip_grad_norm_(a, 0.5)
    n2 = torch.nn.utils.clip_grad_norm_(b, 0.5)
    torch.testing.assert_close(n1, n2)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)


def test_covering_set_covers_every_valid_pair():
    combos, chosen = all_valid_combos(), covering_combos()
    assert all(combo_config(c) is not None for c in chosen)
    names = list(DIMENSIONS)

    def pairs(c):
        return {((a, c[a]), (b, c[b])) for a, b in itertools.combinations(names, 2)}

    valid_pairs = set().union(*(pairs(c) for c in combos))
    assert valid_pairs == set().union(*(pairs(c) for c in chosen))
    assert len(chosen) < 40 < len(combos)
    # invalid combinations are excluded by the same validate() the planner uses
    assert combo_config({**chosen[0], "pp_dp": (1, 1), "distribute_param": True}) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert {c["model"] for c in chosen} == set(DIMENSIONS["model"])


def test_input_errors_are_typed_and_raised_to_the_caller():
    from moreh_ap.errors import InputError

    pm = moreh_ap.parallelize(build_model("mlp", 0), _one())
    with pytest.raises(InputError, match="no loss"):
        pm.train_step(torch.randn(4, 16))
    pm = moreh_ap.parallelize(build_model("mlp", 0), _one(), loss_fn=loss_fn_for("mlp"))
    with pytest.raises(InputError, match="target= is missing"):
        pm.train_step(torch.randn(4, 16))
    with pytest.raises(InputError, match="no input tensor"):
        pm.train_step(target=torch.randn(4, 8))
    assert issubclass(InputError, ValueError)


def test_micro_batches_and_dp_slice_follow_pytrees():
    from collections import namedtuple

    from moreh_ap.runtime.inputs import StepInputs, dp_slice, micro_batches

    Pair = namedtuple("Pair", "x y")
    obj = {"a": torch.arange(8).reshape(4, 2), "b": [Pair(torch.arange(4), 7)], "c": torch.tensor(3.0), "d": None}
    parts = micro_batches(obj, 2, 4)
    assert len(parts) == 2
    assert torch.equal(parts[1]["a"], torch.tensor([[4, 5], [6, 7]]))
    assert isinstance(parts[0]["b"][0], Pair) and torch.equal(parts[0]["b"][0].x, torch.tensor([0, 1]))
    assert parts[1]["b"][0].y == 7 and parts[1]["c"] is obj["c"] and parts[1]["d"] is None
    inputs = StepInputs(args=(torch.arange(6),), kwargs={"m": torch.ones(6, 2)}, target=torch.arange(6) * 10,
                        hf_labels=False, batch=6)
    mine, local = dp_slice(inputs, dp=3, dp_rank=2)
    assert local == 2 and torch.equal(mine.args[0], torch.tensor([4, 5])) and mine.kwargs["m"].shape == (2, 2)
    assert torch.equal(mine.target, torch.tensor([40, 50]))


def test_one_process_has_no_wrapper_and_leaves_optimizers_alone():
    from moreh_ap.runtime.apply import Wrapper

    model = build_model("gpt", 0)
    opt = moreh_ap.FusedLAMB(model.parameters())
    pm = moreh_ap.parallelize(model, _one(), optimizer=opt, loss_fn=loss_fn_for("gpt"))
    assert pm.wrapper is Wrapper.NONE and (pm.pp, pm.dp, pm.world, pm.pp_rank, pm.dp_rank) == (1, 1, 1, 0, 0)
    assert opt.grad_norm_fn is None  # one process: FusedLAMB's own norm is the global one


def test_own_fsdp_units_follow_the_shared_rule():
    from moreh_ap.runtime.apply import Stage, _large_non_block_modules
    from moreh_ap.models import find_adapter

    gpt, gpt2 = build_model("gpt", 0), build_model("gpt2", 0)
    units = {kind: _large_non_block_modules(Stage(0, m, find_adapter(m).container(), True, True))
             for kind, m in (("gpt", gpt), ("gpt2", gpt2))}
    assert any(isinstance(m, nn.Embedding) for m in units["gpt"])  # the embedding and the head: own units
    assert all(m is not gpt2.transformer.wte and m is not gpt2.lm_head for m in units["gpt2"])  # tied: root
