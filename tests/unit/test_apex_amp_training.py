# apex's own amp tests (tests/L0/run_amp, summarized in spec/apex-compat.md §5), rebuilt for moreh_ap on CPU.
import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moreh_ap.apex import amp
from moreh_ap.apex.amp import _amp_state
from moreh_ap.apex.amp import loss_casts

LEVELS = ("O0", "O1", "O2", "O3")


@pytest.fixture(autouse=True)
def _reset_amp_state():
    yield
    _amp_state.allow_incoming_model_not_fp32 = False
    _amp_state.verbosity = 1
    loss_casts.uninstall()  # O1's process-wide fp32 losses must not leak into other tests


# -- test_checkpointing.py ------------------------------------------------------------------------


class ConvModel(nn.Module):
    """Conv2d(3,6,3,1,1) -> relu -> BatchNorm2d(6), times a scalar parameter (apex's MyModel)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(6)
        self.param = nn.Parameter(torch.randn(1))

    def forward(self, x):
        x = x * self.param
        x = F.relu(self.conv1(x))
        return self.bn1(x)


def _train_step(model, optimizer, data, loss_ids):
    optimizer.zero_grad()
    output = model(data)
    for idx in loss_ids:
        loss = output.mean()
        with amp.scale_loss(loss, optimizer, loss_id=idx) as scaled_loss:
            scaled_loss.backward(retain_graph=True)
    optimizer.step()
    return output


def _assert_state_dict_fp32(sd):
    for key, value in sd.items():
        if "num_batches_tracked" not in key:
            assert value.dtype == torch.float32, (key, value.dtype)


@pytest.mark.parametrize("level", LEVELS)
def test_restoring(level):
    nb_steps, restore_at = 10, 5
    for amp_before_load, num_losses in itertools.product((True, False), (1, 2)):
        setup = f"{level} amp_before_load={amp_before_load} num_losses={num_losses}"
        torch.manual_seed(2)
        model = ConvModel()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        model, optimizer = amp.initialize(model, optimizer, opt_level=level, num_losses=num_losses * 2, verbosity=0)
        gen = torch.Generator().manual_seed(3)
        for step in range(nb_steps):
            x = torch.randn(4, 3, 8, 8, generator=gen)
            output = _train_step(model, optimizer, x, range(num_losses))
            if step == restore_at - 1:
                checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
                _assert_state_dict_fp32(checkpoint["model"])
                restore_model = ConvModel()
                restore_optimizer = torch.optim.SGD(restore_model.parameters(), lr=1e-3)
                if amp_before_load:
                    restore_model, restore_optimizer = amp.initialize(
                        restore_model, restore_optimizer, opt_level=level, num_losses=num_losses * 2, verbosity=0)
                restore_model.load_state_dict(checkpoint["model"])
                restore_optimizer.load_state_dict(checkpoint["optimizer"])
                if not amp_before_load:
                    restore_model, restore_optimizer = amp.initialize(
                        restore_model, restore_optimizer, opt_level=level, num_losses=num_losses * 2, verbosity=0)
            elif step >= restore_at:
                restore_output = _train_step(restore_model, restore_optimizer, x, range(num_losses, num_losses * 2))
                # O2's fp32 masters are not in the checkpoint (apex's too): the restored masters start
                # from the fp16-rounded weights, so O2 matches to fp16 precision only.
                tol = dict(rtol=2e-3, atol=2e-3) if level == "O2" else dict(rtol=0, atol=0)
                torch.testing.assert_close(output.float(), restore_output.float(), **tol, msg=setup)
                sd, restored_sd = model.state_dict(), restore_model.state_dict()
                assert list(sd) == list(restored_sd)
                for key in sd:
                    torch.testing.assert_close(sd[key], restored_sd[key], **tol, msg=f"{setup}: {key}")


def test_restoring_amp_state_dict():
    # apex never tested amp.load_state_dict (FIXME in its test): save the scalers mid-training, reload.
    model = ConvModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model, optimizer = amp.initialize(model, optimizer, opt_level="O2", num_losses=2, verbosity=0)
    _train_step(model, optimizer, torch.randn(4, 3, 8, 8) * 2**17, [1])  # overflow on loss 1
    _train_step(model, optimizer, torch.randn(4, 3, 8, 8), [0, 1])
    saved = amp.state_dict()
    assert saved["loss_scaler1"]["loss_scale"] == 32768.0
    model2 = ConvModel()
    amp.initialize(model2, torch.optim.SGD(model2.parameters(), lr=1e-3), opt_level="O2", num_losses=2, verbosity=0)
    assert amp.state_dict() != saved
    amp.load_state_dict(saved)
    assert amp.state_dict() == saved


@pytest.mark.parametrize("level", LEVELS)
def test_loss_scale_decrease(level):
    num_losses, decreases = 3, [0, 1, 2]
    model = ConvModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model, optimizer = amp.initialize(model, optimizer, opt_level=level, num_losses=num_losses, verbosity=0)
    if _amp_state.opt_properties.loss_scale != "dynamic":
        assert level in ("O0", "O3")
        return
    initial = [s.loss_scale() for s in _amp_state.loss_scalers]
    remaining = list(decreases)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(len(decreases)):
        x = torch.randn(4, 3, 8, 8)
        for idx in range(num_losses):
            while remaining[idx] > 0:
                optimizer.zero_grad()
                loss = model(x * 2**17).mean()  # inf in fp16
                with amp.scale_loss(loss, optimizer, loss_id=idx) as scaled_loss:
                    scaled_loss.backward(retain_graph=True)
                optimizer.step()
                remaining[idx] -= 1
    updated = [s.loss_scale() for s in _amp_state.loss_scalers]
    assert updated == [init / 2**k for init, k in zip(initial, decreases)]
    sd = amp.state_dict()
    for idx, (k, init) in enumerate(zip(decreases, initial)):
        assert sd["loss_scaler%d" % idx] == {"loss_scale": init / 2**k, "unskipped": 0}
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # every step was skipped


@pytest.mark.parametrize("level", ("O0", "O1", "O2"))
def test_state_dict_has_no_half_and_model_trains(level):
    torch.manual_seed(0)
    model = ConvModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model, optimizer = amp.initialize(model, optimizer, opt_level=level, verbosity=0)
    assert all(v.dtype != torch.float16 for v in model.state_dict().values())
    data, target = torch.randn(10, 3, 4, 4), torch.randn(10, 6, 4, 4)
    last = float("inf")
    for _ in range(10):
        optimizer.zero_grad()
        loss = F.mse_loss(model(data), target)
        with amp.scale_loss(loss, optimizer) as scaled_loss:
            scaled_loss.backward()
        optimizer.step()
        assert loss.item() < last
        last = loss.item()


# -- test_multiple_models_optimizers_losses.py ----------------------------------------------------


class TwoWeights(nn.Module):
    """w0 fp32 [u, u+1], w1 fp16 [1+u, 2+u]; loss = sum(x * w0 * w1) (apex's MyModel)."""

    def __init__(self, unique):
        super().__init__()
        self.weight0 = nn.Parameter(unique + torch.arange(2, dtype=torch.float32))
        self.weight1 = nn.Parameter(1.0 + unique + torch.arange(2, dtype=torch.float16))

    def forward(self, x):
        return (x * self.weight0.float() * self.weight1.float()).sum()


# Each scenario: model uniques; optimizers as lists of (model index, lr) groups plus a momentum;
# losses as (model indices summed, optimizer indices given to scale_loss).
SCENARIOS = {
    "2models2losses1optimizer": ([1, 2], [([(0, 0.25), (1, 0.5)], 0.125)], [([0], [0]), ([1], [0])]),
    "3models2losses1optimizer": (
        [1, 2, 3], [([(0, 0.25), (1, 0.5), (2, 0.125)], 0.125)], [([0, 2], [0]), ([1, 2], [0])]),
    "2models2losses2optimizers": ([1, 2], [([(0, 0.25)], 0.125), ([(1, 0.5)], 0.25)], [([0], [0]), ([1], [1])]),
    "3models2losses2optimizers": (
        [1, 2, 3], [([(0, 0.25), (1, 0.5)], 0.125), ([(2, 0.125)], 0.25)], [([0, 2], [0, 1]), ([1, 2], [0, 1])]),
}


def _build(uniques, opt_specs):
    models = [TwoWeights(u) for u in uniques]
    optimizers = [
        torch.optim.SGD([{"params": list(models[i].parameters()), "lr": lr} for i, lr in groups], momentum=mom)
        for groups, mom in opt_specs
    ]
    return models, optimizers


def _run_case(scenario, level, how_to_zero, multiple_scalers, inject_iter, inject_loc, which_backward):
    uniques, opt_specs, losses = SCENARIOS[scenario]
    x = torch.ones(2)
    models, optimizers = _build(uniques, opt_specs)
    ref_models, ref_optimizers = _build(uniques, opt_specs)
    _amp_state.allow_incoming_model_not_fp32 = True
    models, optimizers = amp.initialize(models, optimizers, opt_level=level, verbosity=0, cast_model_type=False,
                                        num_losses=2 if multiple_scalers else 1)
    _amp_state.allow_incoming_model_not_fp32 = False
    loss_ids = [0, 1] if multiple_scalers else [0, 0]
    _amp_state.loss_scalers[0]._loss_scale = 4.0
    if multiple_scalers:
        _amp_state.loss_scalers[1]._loss_scale = 16.0
    iters = 3 if inject_iter >= 0 else 2
    for i in range(iters):
        # the un-amped reference: same grads, and it skips what amp must skip
        for opt in ref_optimizers:
            opt.zero_grad()
        for model_ids, _ in losses:
            sum(ref_models[m](x) for m in model_ids).backward()
        if how_to_zero == "none":
            for model in models:
                for p in model.parameters():
                    p.grad = None
        elif how_to_zero == "model":
            for model in models:
                model.zero_grad()
        else:
            for opt in optimizers:
                opt.zero_grad()
        for b, (model_ids, opt_ids) in enumerate(losses):
            loss = sum(models[m](x) for m in model_ids)
            with amp.scale_loss(loss, [optimizers[o] for o in opt_ids], loss_id=loss_ids[b]) as scaled_loss:
                scaled_loss.backward()
                if i == inject_iter and which_backward == b:
                    target = models[model_ids[0]]
                    getattr(target, "weight0" if inject_loc == "fp32" else "weight1").grad[0] = float("inf")
        skipped = set(losses[which_backward][1]) if i == inject_iter else set()
        if i != inject_iter:
            for opt, ref_opt in zip(optimizers, ref_optimizers):
                for p, ref_p in zip(amp.master_params(opt), (q for g in ref_opt.param_groups for q in g["params"])):
                    torch.testing.assert_close(p.grad.float(), ref_p.grad.float())
        for o, (opt, ref_opt) in enumerate(zip(optimizers, ref_optimizers)):
            opt.step()
            if o not in skipped:
                ref_opt.step()
    for opt, ref_opt in zip(optimizers, ref_optimizers):
        model_params = [q for g in ref_opt.param_groups for q in g["params"]]  # the reference's params
        for p_ref, master in zip(model_params, amp.master_params(opt)):
            torch.testing.assert_close(master.to(p_ref.dtype), p_ref)
    for model, ref_model in zip(models, ref_models):
        for p, p_ref in zip(model.parameters(), ref_model.parameters()):
            assert p.dtype == p_ref.dtype
            torch.testing.assert_close(p, p_ref)


def _cases(level):
    inject_iters = (-1, 0, 1) if level in ("O1", "O2") else (-1,)
    for how_to_zero, multiple, inject in itertools.product(("none", "model", "optimizer"), (True, False), inject_iters):
        locs = ("fp16", "fp32") if inject >= 0 else (None,)
        backwards = (0, 1) if inject >= 0 else (None,)
        for loc, backward in itertools.product(locs, backwards):
            yield how_to_zero, multiple, inject, loc, backward


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("level", LEVELS)
def test_multiple_models_optimizers_losses(scenario, level, capsys):
    for case in _cases(level):
        _run_case(scenario, level, *case)


def test_only_the_overflowing_losss_optimizer_skips(capsys):
    # 2 models / 2 losses / 2 optimizers, inf in loss 1's backward: opt1 skips, opt0 steps.
    uniques, opt_specs, losses = SCENARIOS["2models2losses2optimizers"]
    models, optimizers = _build(uniques, opt_specs)
    _amp_state.allow_incoming_model_not_fp32 = True
    models, optimizers = amp.initialize(models, optimizers, opt_level="O2", cast_model_type=False, num_losses=2)
    _amp_state.loss_scalers[0]._loss_scale = 4.0
    _amp_state.loss_scalers[1]._loss_scale = 16.0
    capsys.readouterr()
    before = [[p.detach().clone() for p in m.parameters()] for m in models]
    for b, model in enumerate(models):
        with amp.scale_loss(model(torch.ones(2)), optimizers[b], loss_id=b) as scaled_loss:
            scaled_loss.backward()
            if b == 1:
                model.weight0.grad[0] = float("inf")
    for opt in optimizers:
        opt.step()
    assert capsys.readouterr().out == "Gradient overflow.  Skipping step, loss scaler 1 reducing loss scale to 8.0\n"
    assert not all(torch.equal(a, b) for a, b in zip(before[0], models[0].parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before[1], models[1].parameters()))
    assert [s.loss_scale() for s in _amp_state.loss_scalers] == [4.0, 8.0]


# -- test_add_param_group.py ----------------------------------------------------------------------


def _add_param_group_run(level, zero_before_add, accumulate, use_amp):
    x = torch.ones(2)
    model0, model1 = TwoWeights(1), TwoWeights(2)
    optimizer = torch.optim.SGD([{"params": list(model0.parameters()), "lr": 0.25}], momentum=0.125)
    if use_amp:
        _amp_state.allow_incoming_model_not_fp32 = True
        [model0, model1], optimizer = amp.initialize([model0, model1], optimizer, opt_level=level, verbosity=0,
                                                     cast_model_type=False)
        _amp_state.allow_incoming_model_not_fp32 = False
        _amp_state.loss_scalers[0]._loss_scale = 4.0

    def backward(loss, retain=False):
        if use_amp:
            with amp.scale_loss(loss, optimizer) as scaled_loss:
                scaled_loss.backward(retain_graph=retain)
        else:
            loss.backward(retain_graph=retain)

    optimizer.zero_grad()
    backward(model0(x))
    optimizer.step()
    if zero_before_add:
        optimizer.zero_grad()
    optimizer.add_param_group({"params": list(model1.parameters()), "lr": 0.5})
    if not zero_before_add:
        optimizer.zero_grad()
    for _ in range(2):  # twice: the new params must pick up momentum properly
        loss = model0(x) + model1(x)
        backward(loss, retain=accumulate)
        if accumulate:
            backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in list(model0.parameters()) + list(model1.parameters())]


@pytest.mark.parametrize("level", LEVELS)
def test_add_param_group(level):
    for zero_before_add, accumulate in itertools.product((True, False), (True, False)):
        reference = _add_param_group_run(level, zero_before_add, accumulate, use_amp=False)
        final = _add_param_group_run(level, zero_before_add, accumulate, use_amp=True)
        for ref, got in zip(reference, final):
            torch.testing.assert_close(got.to(ref.dtype), ref)


# -- O1 casting (test_basic_casts.py, test_promotion.py, test_cache.py), autocast's CPU lists -----


class Probe(nn.Module):
    """Runs ``fn`` inside the forward, so that it executes under O1's autocast."""

    def __init__(self, fn):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.fn = fn

    def forward(self, x):
        return self.fn(self, x)


def _o1(fn):
    model = amp.initialize(Probe(fn), opt_level="O1", verbosity=0)
    return model(torch.randn(3, 4))


HALF, FLOAT = torch.float16, torch.float32


@pytest.mark.parametrize(
    "name,fn,expected",
    [
        ("linear", lambda m, x: m.lin(x), HALF),
        ("matmul", lambda m, x: x @ x.t(), HALF),
        ("mm", lambda m, x: torch.mm(x, x.t()), HALF),
        ("bmm", lambda m, x: torch.bmm(x[None], x.t()[None]), HALF),
        ("conv2d", lambda m, x: F.conv2d(x[None, None], torch.randn(2, 1, 2, 2)), HALF),
        ("mse_loss", lambda m, x: F.mse_loss(m.lin(x), x), FLOAT),
        ("cross_entropy", lambda m, x: F.cross_entropy(m.lin(x), torch.zeros(3, dtype=torch.long)), FLOAT),
        ("bce", lambda m, x: F.binary_cross_entropy(torch.sigmoid(m.lin(x)), torch.rand(3, 4)), FLOAT),
        ("relu_of_half", lambda m, x: F.relu(m.lin(x)), HALF),
        ("relu_of_float", lambda m, x: F.relu(x), FLOAT),
        ("batchnorm_of_half", lambda m, x: F.batch_norm(m.lin(x), None, None, training=True), HALF),
        ("add_promotes", lambda m, x: m.lin(x) + x, FLOAT),
        ("mul_promotes", lambda m, x: m.lin(x) * x, FLOAT),
        ("cat_promotes", lambda m, x: torch.cat([m.lin(x), x]), FLOAT),
        ("stack_promotes", lambda m, x: torch.stack([m.lin(x), x]), FLOAT),
        ("inplace_matches_self", lambda m, x: m.lin(x).add_(x), HALF),
        # autocast's CPU lists differ from apex's (apex: FP32 for all of these): input dtype kept
        ("softmax_cpu_keeps_half", lambda m, x: torch.softmax(m.lin(x), -1), HALF),
        ("log_softmax_cpu_keeps_half", lambda m, x: F.log_softmax(m.lin(x), -1), HALF),
        ("layer_norm_cpu_keeps_half", lambda m, x: F.layer_norm(m.lin(x), (4,)), HALF),
        ("sum_cpu_keeps_half", lambda m, x: m.lin(x).sum(), HALF),
        ("pow_cpu_keeps_half", lambda m, x: m.lin(x).pow(2), HALF),
    ],
)
def test_o1_casts(name, fn, expected):
    assert _o1(fn).dtype == expected, name


def test_o1_params_stay_fp32_and_outside_forward_is_not_autocast():
    model = amp.initialize(Probe(lambda m, x: m.lin(x)), opt_level="O1", verbosity=0)
    assert model(torch.randn(2, 4)).dtype == HALF
    assert model.lin.weight.dtype == FLOAT
    assert model.lin(torch.randn(2, 4)).dtype == FLOAT  # a submodule called directly: no autocast
    assert not torch.is_autocast_enabled("cpu")


def test_o1_weight_cast_cache_follows_updates():
    # apex's test_cache: cached fp16 weight casts must stay correct across train -> no_grad eval -> train.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model, optimizer = amp.initialize(model, optimizer, opt_level="O1", loss_scale=1.0, verbosity=0)
    x = torch.randn(3, 4)
    for _ in range(3):
        out = model(x)
        with amp.scale_loss(out.float().pow(2).sum(), optimizer) as scaled_loss:
            scaled_loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            evaluated = model(x)
        expected = F.linear(x.half(), model[0].weight.half(), model[0].bias.half())
        torch.testing.assert_close(evaluated, expected)
        torch.testing.assert_close(model(x), expected)


# -- O1: the loss computed outside the forward (apex ran every loss in fp32, process-wide) ---------

LABELS = torch.tensor([0, 3, 1])
# (name, what the loop does to the output first (in fp16), the loss on that and the fp32 target)
OUTSIDE_LOSSES = [
    ("mse_loss", None, lambda y, t: F.mse_loss(y, t)),
    ("MSELoss_module", None, lambda y, t: nn.MSELoss()(y, t)),
    ("huber_loss", None, lambda y, t: F.huber_loss(y, t)),
    ("bce", torch.sigmoid, lambda y, t: F.binary_cross_entropy(y, t)),
    ("l1_loss", None, lambda y, t: F.l1_loss(y, t)),
    ("cross_entropy", None, lambda y, t: F.cross_entropy(y, LABELS)),
    ("kl_div", lambda y: y.log_softmax(-1), lambda y, t: F.kl_div(y, t.softmax(-1), reduction="batchmean")),
]


@pytest.mark.parametrize("name,prepare,loss_fn", OUTSIDE_LOSSES, ids=[case[0] for case in OUTSIDE_LOSSES])
def test_o1_loss_outside_the_forward_runs_in_fp32(name, prepare, loss_fn):
    """The classic loop: fp16 output, fp32 target, loss outside the model (mixed-dtype backward
    fails in torch for mse_loss <= 2.11, huber_loss and binary_cross_entropy)."""
    prepare = prepare or (lambda y: y)
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    reference = copy.deepcopy(model)
    model, optimizer = amp.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), opt_level="O1", verbosity=0)
    x, target = torch.randn(3, 4), torch.rand(3, 4)
    out = prepare(model(x))
    assert out.dtype == HALF
    loss = loss_fn(out, target)
    assert loss.dtype == FLOAT, name
    with amp.scale_loss(loss, optimizer) as scaled_loss:
        scaled_loss.backward()
    with torch.autocast("cpu", dtype=HALF):  # the same forward; the loss on its fp32 copy, by hand
        ref_out = prepare(reference(x))
    loss_casts.uninstall()
    ref_loss = loss_fn(ref_out.float(), target)
    ref_loss.backward()
    assert torch.equal(loss.detach(), ref_loss.detach())
    torch.testing.assert_close(model.weight.grad, reference.weight.grad)  # scale_loss unscaled them


def test_o1_loss_casts_touch_fp16_only_and_end_with_another_level():
    amp.initialize(nn.Linear(2, 2), opt_level="O1", verbosity=0)
    assert loss_casts.installed()
    assert F.mse_loss.__name__ == "mse_loss"
    bf16 = torch.randn(3, dtype=torch.bfloat16)
    assert F.mse_loss(bf16, bf16).dtype == torch.bfloat16  # bf16 (not apex's O1) is left alone
    assert F.mse_loss(bf16.half(), bf16.half()).dtype == FLOAT
    amp.initialize(nn.Linear(2, 2), opt_level="O2", verbosity=0)
    assert not loss_casts.installed()
    assert F.mse_loss(bf16.half(), bf16.half()).dtype == HALF  # torch's own function is back
