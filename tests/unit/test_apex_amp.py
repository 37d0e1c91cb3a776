# Tests of moreh_ap.apex.amp's front end: opt-level table, overrides, banner, shapes, errors, scaler, state_dict.
import warnings

import pytest
import torch
import torch.nn as nn

import moreh_ap
from moreh_ap.apex import amp
from moreh_ap.apex.amp import _amp_state
from moreh_ap.apex.amp.scaler import LossScaler
from moreh_ap.optim import FusedLAMB


@pytest.fixture(autouse=True)
def _reset_amp_state():
    yield
    _amp_state.allow_incoming_model_not_fp32 = False
    _amp_state.hard_override = False
    _amp_state.verbosity = 1


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _model_opt(lr=0.1):
    m = _model()
    return m, torch.optim.SGD(m.parameters(), lr=lr)


def _opts(**kw):
    m, o = _model_opt()
    amp.initialize(m, o, verbosity=0, **kw)
    return dict(_amp_state.opt_properties.options)


TABLE = {
    "O0": (torch.float32, False, None, False, 1.0),
    "O1": (None, True, None, None, "dynamic"),
    "O2": (torch.float16, False, True, True, "dynamic"),
    "O3": (torch.float16, False, False, False, 1.0),
}
KEYS = ("cast_model_type", "patch_torch_functions", "keep_batchnorm_fp32", "master_weights", "loss_scale")


def test_reachable_as_torch_moreh_apex_amp():
    assert torch.moreh.apex.amp is amp
    assert moreh_ap.apex.amp.initialize is amp.initialize
    assert torch.moreh.apex.optimizers.FusedLAMB is FusedLAMB


@pytest.mark.parametrize("level", ["O0", "O1", "O2", "O3"])
def test_opt_level_table(level):
    opts = _opts(opt_level=level)
    assert opts["enabled"] is True and opts["opt_level"] == level
    assert tuple(opts[k] for k in KEYS) == TABLE[level]
    assert list(opts) == ["enabled", "opt_level", *KEYS]


def test_default_opt_level_is_o1():
    assert _opts()["opt_level"] == "O1"


BANNER_O1 = """Selected optimization level O1:  Insert automatic casts around Pytorch functions and Tensor methods.

Defaults for this optimization level are:
enabled                : True
opt_level              : O1
cast_model_type        : None
patch_torch_functions  : True
keep_batchnorm_fp32    : None
master_weights         : None
loss_scale             : dynamic
Processing user overrides (additional kwargs that are not None)...
After processing overrides, optimization options are:
enabled                : True
opt_level              : O1
cast_model_type        : None
patch_torch_functions  : True
keep_batchnorm_fp32    : None
master_weights         : None
loss_scale             : dynamic
"""


def test_banner_o1_exact(capsys):
    m, o = _model_opt()
    amp.initialize(m, o)
    assert capsys.readouterr().out == BANNER_O1


def test_banner_o3_no_blank_line_and_overrides(capsys):
    m, o = _model_opt()
    amp.initialize(m, o, opt_level="O3", loss_scale="128.0", keep_batchnorm_fp32="True")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Selected optimization level O3:  Pure FP16 training."
    assert out[1] == "Defaults for this optimization level are:"
    assert "cast_model_type        : torch.float16" in out
    after = out[out.index("After processing overrides, optimization options are:"):]
    assert "loss_scale             : 128.0" in after
    assert "keep_batchnorm_fp32    : True" in after
    before = out[: out.index("Processing user overrides (additional kwargs that are not None)...")]
    assert "loss_scale             : 1.0" in before and "keep_batchnorm_fp32    : False" in before


@pytest.mark.parametrize("level,brief", [("O0", "O0:  Pure FP32 training."),
                                         ("O2", "O2:  FP16 training with FP32 batchnorm and FP32 master weights.")])
def test_banner_briefs(capsys, level, brief):
    m, o = _model_opt()
    amp.initialize(m, o, opt_level=level)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Selected optimization level " + brief and out[1] == ""


def test_verbosity_zero_is_silent(capsys):
    m, o = _model_opt()
    amp.initialize(m, o, opt_level="O2", verbosity=0)
    assert capsys.readouterr().out == ""


def test_no_deprecation_warning():
    m, o = _model_opt()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        amp.initialize(m, o, verbosity=0)


def test_overrides_apply_and_convert():
    opts = _opts(opt_level="O2", keep_batchnorm_fp32="False", master_weights=False, loss_scale=128)
    assert opts["keep_batchnorm_fp32"] is False and opts["master_weights"] is False
    assert opts["loss_scale"] == 128.0 and isinstance(opts["loss_scale"], float)
    assert _opts(opt_level="O1", cast_model_type=torch.float32)["cast_model_type"] is torch.float32
    assert _opts(opt_level="O2", cast_model_type=False)["cast_model_type"] is False
    assert _opts(opt_level="O0", loss_scale="dynamic")["loss_scale"] == "dynamic"


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(opt_level="O1", cast_model_type=torch.float16), "O1 inserts casts around Torch functions"),
        (dict(opt_level="O2", patch_torch_functions=True), "patch_torch_functions=True should only be set"),
        (dict(opt_level="O1", keep_batchnorm_fp32=True), "keep_batchnorm_fp32 should be None"),
        (dict(opt_level="O1", master_weights=True), "doesn't make sense to use master_weights with O1"),
    ],
)
def test_override_errors(kw, match):
    m, o = _model_opt()
    with pytest.raises(RuntimeError, match=match):
        amp.initialize(m, o, verbosity=0, **kw)


def test_hard_override_turns_errors_into_printed_warnings(capsys):
    _amp_state.hard_override = True
    m, o = _model_opt()
    amp.initialize(m, o, opt_level="O1", master_weights=False, verbosity=0)
    assert "Warning: It doesn't make sense to use master_weights with O1" in capsys.readouterr().out


def test_keep_batchnorm_fp32_bad_value():
    m, o = _model_opt()
    with pytest.raises(AssertionError, match="keep_batchnorm_fp32 must be a boolean"):
        amp.initialize(m, o, opt_level="O2", keep_batchnorm_fp32="yes", verbosity=0)


@pytest.mark.parametrize("level", ["01", "O4", "o1", 1])
def test_unexpected_opt_level(level):
    m, o = _model_opt()
    with pytest.raises(RuntimeError, match=r"Unexpected optimization level .*the prefix O is the letter O, not the number zero"):
        amp.initialize(m, o, opt_level=level)


def test_type_errors():
    m, o = _model_opt()
    with pytest.raises(TypeError, match="optimizers must be either a single optimizer or a list of optimizers."):
        amp.initialize(m, (o,), verbosity=0)
    m, o = _model_opt()
    with pytest.raises(TypeError, match="models must be either a single model or a list of models."):
        amp.initialize((m,), o, verbosity=0)


def test_parallel_wrapper_rejected():
    m, o = _model_opt()
    with pytest.raises(RuntimeError, match="Parallel wrappers should only be applied to the model"):
        amp.initialize(nn.DataParallel(m), o, verbosity=0)


def test_non_fp32_model_rejected_and_escape_hatch():
    m, o = _model_opt()
    m.half()
    with pytest.raises(RuntimeError, match=r"(?s)Found param 0.weight with type torch.HalfTensor.*do not need to call .half\(\)"):
        amp.initialize(m, o, verbosity=0)
    m2 = _model().double()
    with pytest.raises(RuntimeError, match="torch.DoubleTensor"):
        amp.initialize(m2, verbosity=0)
    _amp_state.allow_incoming_model_not_fp32 = True
    m3, o3 = _model_opt()
    m3[0].half()
    amp.initialize(m3, o3, opt_level="O1", verbosity=0)


def test_same_optimizer_twice():
    m, o = _model_opt()
    amp.initialize(m, o, verbosity=0)
    with pytest.raises(RuntimeError, match="A given optimizer should only be passed through amp.initialize once."):
        amp.initialize(_model(), o, verbosity=0)
    # a second initialize with fresh objects is allowed (apex's tests do it)
    amp.initialize(*_model_opt(), verbosity=0)


def test_return_shapes():
    m = _model()
    assert amp.initialize(m, verbosity=0) is m
    ms = [_model(), _model()]
    assert amp.initialize(ms, verbosity=0) is ms
    m, o = _model_opt()
    assert amp.initialize(m, o, verbosity=0) == (m, o)
    m1, o1 = _model_opt()
    m2, o2 = _model_opt()
    out_m, out_o = amp.initialize([m1, m2], o1, verbosity=0)
    assert out_m == [m1, m2] and out_o is o1
    m, oa = _model_opt()
    ob = torch.optim.SGD(m.parameters(), lr=0.1)
    opts = [oa, ob]
    out_m, out_o = amp.initialize(m, opts, verbosity=0)
    assert out_m is m and out_o is opts
    m, o = _model_opt()
    ms, os_ = [m], [o]
    assert amp.initialize(ms, os_, verbosity=0) == (ms, os_)
    m = _model()
    assert amp.initialize(m, [], verbosity=0) == (m, [])


def test_disabled_returns_untouched_and_scale_loss_is_identity():
    m, o = _model_opt()
    assert amp.initialize(m, o, enabled=False) == (m, o)
    assert amp.initialize(m, enabled=False) is m
    assert not hasattr(o, "_amp_stash")
    assert all(p.dtype == torch.float32 for p in m.parameters())
    loss = m(torch.randn(3, 4)).sum()
    with amp.scale_loss(loss, o) as scaled:
        assert scaled is loss


def test_scale_loss_before_initialize(monkeypatch):
    monkeypatch.delattr(_amp_state, "opt_properties", raising=False)
    loss = torch.ones((), requires_grad=True)
    with pytest.raises(RuntimeError, match="Invoked 'with amp.scale_loss`, but internal Amp state has not been initialized"):
        with amp.scale_loss(loss, torch.optim.SGD([loss], lr=1.0)):
            pass


def test_scale_loss_with_an_unprocessed_optimizer():
    m, o = _model_opt()
    amp.initialize(m, o, opt_level="O1", verbosity=0)
    other = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="not returned by amp.initialize"):
        with amp.scale_loss(m(torch.randn(3, 4)).sum(), other):
            pass


# -- the loss scaler ------------------------------------------------------------------------------


def _step(scaler, overflow):
    scaler.clear_overflow_state()
    scaler._has_overflow = overflow
    return scaler.update_scale()


def test_dynamic_scaler_schedule():
    s = LossScaler("dynamic")
    assert s.loss_scale() == 65536.0 and s.dynamic
    assert _step(s, True) is True and s.loss_scale() == 32768.0 and s._unskipped == 0
    for _ in range(1999):
        assert _step(s, False) is False
    assert s.loss_scale() == 32768.0 and s._unskipped == 1999
    _step(s, False)
    assert s.loss_scale() == 65536.0 and s._unskipped == 0
    capped = LossScaler("dynamic", max_loss_scale=2.0**16)
    for _ in range(2000):
        _step(capped, False)
    assert capped.loss_scale() == 65536.0
    assert LossScaler("dynamic", max_loss_scale=1024.0).loss_scale() == 1024.0


def test_dynamic_scaler_bounds():
    floor = LossScaler("dynamic", min_loss_scale=16384.0)
    for _ in range(5):
        assert _step(floor, True) is True
    assert floor.loss_scale() == 16384.0
    no_floor = LossScaler("dynamic", min_loss_scale=0)  # 0 means no floor, as in apex
    for _ in range(20):
        _step(no_floor, True)
    assert no_floor.loss_scale() == 65536.0 / 2**20


def test_static_scaler_never_skips():
    s = LossScaler(128.0)
    assert not s.dynamic and s.loss_scale() == 128.0
    assert _step(s, True) is False and s.loss_scale() == 128.0 and s._unskipped == 1
    for _ in range(2500):
        _step(s, False)
    assert s.loss_scale() == 128.0


def test_unscale_detects_inf_and_nan():
    s = LossScaler("dynamic")
    grads = [torch.full((3,), 65536.0), torch.full((2,), 32768.0, dtype=torch.float16)]
    s.unscale_(grads)
    assert not s._has_overflow
    torch.testing.assert_close(grads, [torch.ones(3), torch.full((2,), 0.5, dtype=torch.float16)])
    s.unscale_([torch.tensor([1.0, float("nan")])])
    assert s._has_overflow


# -- amp.state_dict / load_state_dict ------------------------------------------------------------


def test_state_dict_and_load_state_dict(capsys):
    amp.initialize(*_model_opt(), num_losses=2, verbosity=0)
    _amp_state.loss_scalers[1]._loss_scale = 512.0
    _amp_state.loss_scalers[1]._unskipped = 7
    sd = amp.state_dict()
    assert list(sd) == ["loss_scaler0", "loss_scaler1"]
    assert sd["loss_scaler0"] == {"loss_scale": 65536.0, "unskipped": 0}
    assert sd["loss_scaler1"] == {"loss_scale": 512.0, "unskipped": 7}
    amp.initialize(*_model_opt(), num_losses=2, verbosity=0)
    amp.load_state_dict(sd)
    assert capsys.readouterr().out == ""
    assert (_amp_state.loss_scalers[1]._loss_scale, _amp_state.loss_scalers[1]._unskipped) == (512.0, 7)


def test_load_state_dict_count_mismatch_is_positional(capsys):
    amp.initialize(*_model_opt(), num_losses=1, verbosity=0)
    amp.load_state_dict({"loss_scaler5": {"loss_scale": 8.0, "unskipped": 3},
                         "loss_scaler6": {"loss_scale": 4.0, "unskipped": 1}})
    out = capsys.readouterr().out.splitlines()
    assert out == ["Warning: state_dict contains 2 entries, while 1 loss_scalers are used",
                   "Skipping loss_scaler[1], since num_losses was set to 1"]
    assert _amp_state.loss_scalers[0]._loss_scale == 8.0  # positional: the key's index is ignored


def test_load_state_dict_unexpected_key_after_loading_valid_ones(capsys):
    amp.initialize(*_model_opt(), num_losses=1, verbosity=0)
    with pytest.raises(RuntimeError, match='Error\\(s\\) in loading state_dict. Unexpected key\\(s\\) in state_dict: "foo". '):
        amp.load_state_dict({"foo": 1, "loss_scaler0": {"loss_scale": 2.0, "unskipped": 5}})
    assert _amp_state.loss_scalers[0]._loss_scale == 2.0
    assert "Warning: state_dict contains 2 entries, while 1 loss_scalers are used" in capsys.readouterr().out


# -- overflow handling and O2 details -------------------------------------------------------------


def _inf_backward(model, opt, loss_id=0, inf=True):
    loss = model(torch.randn(5, 4)).mean() * 1e-3  # small: no real overflow at a 2**16 scale
    with amp.scale_loss(loss, opt, loss_id=loss_id) as scaled:
        scaled.backward()
        if inf:
            model[0].weight.grad[0, 0] = float("inf")


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_overflow_skips_one_step_with_apex_message(capsys, level):
    m, o = _model_opt()
    m, o = amp.initialize(m, o, opt_level=level, verbosity=1)
    capsys.readouterr()
    before = [p.detach().clone() for p in m.parameters()]
    _inf_backward(m, o)
    o.step()
    assert capsys.readouterr().out == "Gradient overflow.  Skipping step, loss scaler 0 reducing loss scale to 32768.0\n"
    assert [torch.equal(a, b) for a, b in zip(before, m.parameters())] == [True] * len(before)
    if level == "O2":  # the masters of fp16 params lose their grads
        assert all(p.grad is None for p in o._amp_stash.all_fp32_from_fp16_params)
        assert len(o._amp_stash.all_fp32_from_fp16_params) == 4
    assert "step" not in vars(o) or level == "O2"  # the one-shot patch is gone
    o.zero_grad()
    _inf_backward(m, o, inf=False)
    o.step()
    assert capsys.readouterr().out == ""
    assert not all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert amp.state_dict()["loss_scaler0"] == {"loss_scale": 32768.0, "unskipped": 1}


def test_static_loss_scale_never_skips(capsys):
    m, o = _model_opt()
    m, o = amp.initialize(m, o, opt_level="O2", loss_scale=128.0, verbosity=1)
    capsys.readouterr()
    _inf_backward(m, o)
    o.step()
    assert "Gradient overflow" not in capsys.readouterr().out
    assert not torch.isfinite(m[0].weight).all()  # the inf went into the update
    assert _amp_state.loss_scalers[0].loss_scale() == 128.0


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # the first step was skipped
def test_overflow_with_a_lr_scheduler():
    m, o = _model_opt()
    m, o = amp.initialize(m, o, opt_level="O2", verbosity=0)
    sched = torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)
    _inf_backward(m, o)
    o.step()
    sched.step()
    _inf_backward(m, o, inf=False)
    o.step()
    sched.step()
    assert o.param_groups[0]["lr"] == pytest.approx(0.025)


def test_closure_is_rejected():
    m, o = _model_opt()
    m, o = amp.initialize(m, o, opt_level="O2", verbosity=0)
    with pytest.raises(RuntimeError, match="Currently, Amp does not support closure use with optimizers."):
        o.step(lambda: 0.0)
    _inf_backward(m, o)
    with pytest.raises(RuntimeError, match="Currently, Amp does not support closure use with optimizers."):
        o.step(lambda: 0.0)


def test_o2_model_masters_and_grads():
    m, o = _model_opt(lr=0.5)
    m, o = amp.initialize(m, o, opt_level="O2", verbosity=0)
    assert m[0].weight.dtype == torch.float16 and m[3].weight.dtype == torch.float16
    assert m[1].weight.dtype == torch.float32 and m[1].running_mean.dtype == torch.float32  # batch norm
    assert all(p.dtype == torch.float16 for p in amp.master_params(o) if p.dim() == 2)  # lazy: not yet
    sd = m.state_dict()
    assert all(v.dtype != torch.float16 for v in sd.values())
    x = torch.randn(5, 4, dtype=torch.float64)
    out = m(x)
    assert out.dtype == torch.float32
    with amp.scale_loss(out.mean() * 1e-3, o) as scaled:
        scaled.backward()
    masters = list(amp.master_params(o))
    assert all(p.dtype == torch.float32 for p in masters)
    scale = _amp_state.loss_scalers[0].loss_scale()
    # fp16 model grads stay scaled; fp32 master grads are unscaled
    torch.testing.assert_close(m[0].weight.grad.float() / scale, masters[0].grad, rtol=1e-3, atol=1e-3)
    o.step()
    for model_p, master in zip(m.parameters(), amp.master_params(o)):
        assert torch.equal(model_p, master.to(model_p.dtype))
        if model_p.dtype == torch.float16:  # masters of fp16 params: grads cleared after step
            assert master is not model_p and master.grad is None


def test_cast_model_outputs():
    m, o = _model_opt()
    m, o = amp.initialize(m, o, opt_level="O2", cast_model_outputs=torch.float16, verbosity=0)
    assert m(torch.randn(3, 4)).dtype == torch.float16
    m2, o2 = _model_opt()
    m2, o2 = amp.initialize(m2, o2, opt_level="O1", cast_model_outputs=torch.float32, verbosity=0)
    assert m2(torch.randn(3, 4)).dtype == torch.float32


def test_forward_casts_nested_inputs_only_floats():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, batch):
            seen = {k: v.dtype for k, v in batch.items()}
            return {"out": self.lin(batch["x"]), "seen": seen, "ids": batch["ids"]}

    net = amp.initialize(Net(), opt_level="O3", verbosity=0)
    res = net({"x": torch.randn(2, 3), "ids": torch.arange(2)})
    assert res["seen"] == {"x": torch.float16, "ids": torch.int64}
    assert res["out"].dtype == torch.float32 and res["ids"].dtype == torch.int64


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_delay_unscale_accumulates_like_one_backward(level):
    def run(delay):
        torch.manual_seed(1)
        m = nn.Linear(4, 2)
        o = torch.optim.SGD(m.parameters(), lr=0.1)
        m, o = amp.initialize(m, o, opt_level=level, loss_scale=64.0, verbosity=0)
        x1, x2 = torch.randn(3, 4), torch.randn(3, 4)
        with amp.scale_loss(m(x1).sum(), o, delay_unscale=delay) as s:
            s.backward()
        with amp.scale_loss(m(x2).sum(), o) as s:
            s.backward()
        return [p.grad.clone() for p in amp.master_params(o)]

    # O2 accumulates the scaled fp16 model grads (as apex), hence fp16 rounding there
    tol = dict(rtol=1e-3, atol=1e-3) if level == "O2" else {}
    torch.testing.assert_close(run(True), run(False), **tol)


def test_o2_with_fused_lamb():
    m = _model()
    o = FusedLAMB(m.parameters(), lr=1e-2)
    m, o = amp.initialize(m, o, opt_level="O2", verbosity=0)
    for _ in range(3):
        loss = m(torch.randn(6, 4)).pow(2).mean()
        with amp.scale_loss(loss, o) as scaled:
            scaled.backward()
        o.step()
        o.zero_grad()
    for model_p, master in zip(m.parameters(), amp.master_params(o)):
        assert master.dtype == torch.float32
        assert torch.equal(model_p, master.to(model_p.dtype))
    assert o.param_groups[0]["step"] >= 1
