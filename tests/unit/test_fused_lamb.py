# Tests of moreh_ap.optim.FusedLAMB against an independent per-parameter LAMB written here (apex's RefLAMB rules).
import math
import subprocess
import sys

import pytest
import torch

from moreh_ap.optim import FusedLAMB
from moreh_ap.optim import fused_lamb as fused_lamb_module
from tests.helpers.paths import REPO_ROOT

ITERS = 7


class RefLAMB:
    """Per-parameter LAMB in plain tensor ops, following apex's test RefLAMB and kernel rules.

    Differs from apex's RefLAMB only in being general: ``max_grad_norm``,
    ``use_nvlamb=False`` (no trust ratio for groups with weight_decay 0),
    ``adam_w_mode=False`` (L2), ``grad_averaging=False``, ``bias_correction=False``.
    Global norm in float64; moments in fp32; math in fp32 for every param dtype.
    """

    def __init__(self, params, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 max_grad_norm=1.0, use_nvlamb=True, adam_w_mode=True, grad_averaging=True,
                 bias_correction=True):
        self.params = list(params)
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.max_grad_norm, self.use_nvlamb = max_grad_norm, use_nvlamb
        self.adam_w_mode, self.grad_averaging, self.bias_correction = adam_w_mode, grad_averaging, bias_correction
        self.m = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.v = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        b1, b2 = self.betas
        sq = sum(float(p.grad.double().pow(2).sum()) for p in self.params)
        gnorm = math.sqrt(sq)
        clip = gnorm / self.max_grad_norm if gnorm > self.max_grad_norm else 1.0
        for p, m, v in zip(self.params, self.m, self.v):
            pf = p.float()
            g = p.grad.float() / clip
            if not self.adam_w_mode and self.wd != 0:
                g = g + self.wd * pf
            m.mul_(b1).add_(g, alpha=(1 - b1) if self.grad_averaging else 1.0)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            bc1 = 1 - b1 ** self.t if self.bias_correction else 1.0
            bc2 = 1 - b2 ** self.t if self.bias_correction else 1.0
            update = (m / bc1) / ((v / bc2).sqrt() + self.eps)
            if self.adam_w_mode and self.wd != 0:
                update = update + self.wd * pf
            trust = 1.0
            if self.use_nvlamb or self.wd != 0:
                w_norm, u_norm = pf.norm().item(), update.norm().item()
                if w_norm > 0 and u_norm > 0:
                    trust = w_norm / u_norm
            p.copy_(pf - self.lr * trust * update)


def _make_params(shapes, dtype=torch.float32, seed=9876):
    gen = torch.Generator().manual_seed(seed)
    ref = [torch.rand(s, generator=gen).to(dtype) for s in shapes]
    tst = [r.clone() for r in ref]
    return ref, tst


def _run(shapes, *, grad_scale=1.0, dtype=torch.float32, iters=ITERS, ref_kw=None, tst_kw=None):
    """Step a RefLAMB and a FusedLAMB side by side on the same (separate) grads; return both param lists."""
    ref_p, tst_p = _make_params(shapes, dtype)
    ref = RefLAMB(ref_p, **(ref_kw or {}))
    tst = FusedLAMB(tst_p, **(tst_kw or {}))
    gen = torch.Generator().manual_seed(1234)
    norms = []
    scales = grad_scale if isinstance(grad_scale, (list, tuple)) else [grad_scale]
    for step in range(iters):
        for r, t in zip(ref_p, tst_p):
            r.grad = (torch.rand(r.shape, generator=gen) * scales[step % len(scales)]).to(dtype)
            t.grad = r.grad.clone()  # separate tensor: the reference cannot clip it for FusedLAMB
        norms.append(math.sqrt(sum(float(r.grad.double().pow(2).sum()) for r in ref_p)))
        ref.step()
        tst.step()
        torch.testing.assert_close(tst_p, ref_p)
    return ref_p, tst_p, norms


HYPER = dict(lr=5e-4, betas=(0.9, 0.999), eps=1e-8)
MULTI_SHAPES = [(64, 32), (64,), (64, 48), (323, 16), (1,)]


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_float_single_tensor(wd):
    _, _, norms = _run([(18011,)], ref_kw=dict(HYPER, weight_decay=wd),
                       tst_kw=dict(HYPER, weight_decay=wd, use_nvlamb=True))
    assert min(norms) > 1.0  # clipping active


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_multi_params(wd):
    _run(MULTI_SHAPES, ref_kw=dict(HYPER, weight_decay=wd), tst_kw=dict(HYPER, weight_decay=wd, use_nvlamb=True))


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_lamb_option_one_element(wd):
    kw = dict(lr=0.01, betas=(0.6, 0.9), eps=3e-6, weight_decay=wd)
    _run([(1,)], ref_kw=kw, tst_kw=dict(kw, use_nvlamb=True))


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_use_nvlamb_false_rule(wd):
    # Default use_nvlamb=False: trust ratio only where weight_decay != 0.
    _run(MULTI_SHAPES, ref_kw=dict(HYPER, weight_decay=wd, use_nvlamb=False), tst_kw=dict(HYPER, weight_decay=wd))


# Gradient magnitudes that change from step to step (LAMB is nearly scale-invariant otherwise, so a
# constant clip factor would hardly show). Global norms here: ~63 * scale.
ALTERNATING = [1.0, 20.0]


@pytest.mark.parametrize(
    "scales,max_norm,expect",
    [
        ([s for s in ALTERNATING], 1.0, "all"),              # always above max_grad_norm
        ([1e-4 * s for s in ALTERNATING], 1.0, "none"),      # always below
        ([1e-2, 1.0], 1.0, "mixed"),                         # ~0.63 (below), ~63 (above)
        (ALTERNATING, 100.0, "mixed"),                       # ~63 (below), ~1260 (above)
        (ALTERNATING, float("inf"), "none"),                 # clipping disabled
    ],
)
def test_clipping_above_and_below(scales, max_norm, expect):
    kw = dict(HYPER, weight_decay=0.01, max_grad_norm=max_norm)
    _, _, norms = _run(MULTI_SHAPES, grad_scale=scales, ref_kw=kw, tst_kw=kw)
    clipped = [n > max_norm for n in norms]
    assert {"all": all(clipped), "none": not any(clipped), "mixed": any(clipped) and not all(clipped)}[expect]


def test_clipping_matters():
    # The same run without clipping in the reference must NOT match: clipping is really applied.
    kw = dict(HYPER, weight_decay=0.01)
    with pytest.raises(AssertionError):
        _run(MULTI_SHAPES, grad_scale=ALTERNATING, ref_kw=dict(kw, max_grad_norm=float("inf")), tst_kw=kw, iters=3)


@pytest.mark.parametrize(
    "variant",
    [
        dict(adam_w_mode=False),
        dict(grad_averaging=False),
        dict(bias_correction=False),
        dict(adam_w_mode=False, grad_averaging=False, bias_correction=False, use_nvlamb=True),
    ],
)
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_option_variants(variant, wd):
    kw = dict(lr=0.01, betas=(0.6, 0.9), eps=3e-6, weight_decay=wd)
    ref_variant = dict(variant)
    ref_variant.setdefault("use_nvlamb", False)
    _run(MULTI_SHAPES, ref_kw=dict(kw, **ref_variant), tst_kw=dict(kw, **variant))


def test_param_groups_own_hyperparameters_and_global_clip():
    def data():
        gen = torch.Generator().manual_seed(0)
        a, b = torch.rand(50, generator=gen), torch.rand(7, 3, generator=gen)
        grads = [(torch.rand(50, generator=gen), torch.rand(7, 3, generator=gen)) for _ in range(ITERS)]
        return a, b, grads

    # FusedLAMB: two groups, one clip over BOTH groups; the second group has its own lr, wd 0 (so no
    # trust ratio by default) and a per-group max_grad_norm that apex ignores.
    a_tst, b_tst, grads = data()
    tst = FusedLAMB([{"params": [a_tst]},
                     {"params": [b_tst], "weight_decay": 0.0, "lr": 2e-3, "max_grad_norm": 1e9}],
                    lr=1e-3, weight_decay=0.01)
    for ga, gb in grads:
        a_tst.grad, b_tst.grad = ga.clone(), gb.clone()
        tst.step()
    # Reference: two independent per-parameter LAMBs fed grads pre-clipped by the joint norm.
    a_ref, b_ref, grads = data()
    ref1 = RefLAMB([a_ref], lr=1e-3, weight_decay=0.01, max_grad_norm=float("inf"), use_nvlamb=False)
    ref2 = RefLAMB([b_ref], lr=2e-3, weight_decay=0.0, max_grad_norm=float("inf"), use_nvlamb=False)
    for ga, gb in grads:
        total = math.sqrt(float(ga.double().pow(2).sum() + gb.double().pow(2).sum()))
        assert total > 1.0
        a_ref.grad, b_ref.grad = ga / total, gb / total
        ref1.step()
        ref2.step()
    torch.testing.assert_close([a_tst, b_tst], [a_ref, b_ref])
    assert [g["step"] for g in tst.param_groups] == [ITERS, ITERS]


def test_step_counter_advances_for_groups_without_grads():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = FusedLAMB([{"params": [a]}, {"params": [b]}])
    a.grad = torch.ones(3)
    opt.step()
    opt.step()
    assert [g["step"] for g in opt.param_groups] == [2, 2]
    assert b not in opt.state or not opt.state[b]
    torch.testing.assert_close(b.detach(), torch.ones(2))


def test_grad_becomes_update_as_apex():
    p = torch.nn.Parameter(torch.rand(5))
    before = p.detach().clone()
    opt = FusedLAMB([p], lr=0.1, weight_decay=0.0, max_grad_norm=float("inf"))
    p.grad = torch.rand(5)
    opt.step()
    # wd 0, use_nvlamb False -> p -= lr * u, and apex leaves u in p.grad.
    torch.testing.assert_close(p.detach(), before - 0.1 * p.grad)


def test_nan_grad_propagates_and_inf_norm_zeroes_finite_grads():
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = FusedLAMB([p, q], weight_decay=0.0)
    p.grad, q.grad = torch.tensor([1.0, float("inf"), 1.0]), torch.ones(3)
    opt.step()
    torch.testing.assert_close(q.detach(), torch.ones(3))  # finite grads / inf = 0 -> no move
    assert torch.isnan(p).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_fp32_moments(dtype):
    kw = dict(HYPER, weight_decay=0.01, use_nvlamb=True)
    ref_p, tst_p = _make_params(MULTI_SHAPES, dtype)
    ref, tst = RefLAMB(ref_p, **kw), FusedLAMB(tst_p, **kw)
    gen = torch.Generator().manual_seed(5)
    for _ in range(ITERS):
        for r, t in zip(ref_p, tst_p):
            r.grad = torch.rand(r.shape, generator=gen).to(dtype)
            t.grad = r.grad.clone()
        ref.step()
        tst.step()
    torch.testing.assert_close(tst_p, ref_p)  # bf16/fp16 default tolerances
    for p in tst_p:
        assert p.dtype == dtype
        assert tst.state[p]["exp_avg"].dtype == torch.float32
        assert tst.state[p]["exp_avg_sq"].dtype == torch.float32
    # the moments match the fp32 reference's moments closely
    torch.testing.assert_close([tst.state[p]["exp_avg"] for p in tst_p], ref.m, rtol=1e-5, atol=1e-6)


def test_mixed_fp32_and_bf16_in_one_group():
    ref_p, tst_p = _make_params([(10, 4), (9,)])
    ref_p[1], tst_p[1] = ref_p[1].bfloat16(), tst_p[1].bfloat16()
    kw = dict(HYPER, weight_decay=0.01, use_nvlamb=True)
    ref, tst = RefLAMB(ref_p, **kw), FusedLAMB(tst_p, **kw)
    gen = torch.Generator().manual_seed(7)
    for _ in range(ITERS):
        for r, t in zip(ref_p, tst_p):
            r.grad = torch.rand(r.shape, generator=gen).to(r.dtype)
            t.grad = r.grad.clone()
        ref.step()
        tst.step()
    torch.testing.assert_close(tst_p[0], ref_p[0])
    torch.testing.assert_close(tst_p[1], ref_p[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip(dtype):
    def fresh():
        gen = torch.Generator().manual_seed(3)
        return [torch.nn.Parameter(torch.rand(s, generator=gen).to(dtype)) for s in MULTI_SHAPES]

    def grads(step):
        gen = torch.Generator().manual_seed(100 + step)
        return [torch.rand(s, generator=gen).to(dtype) for s in MULTI_SHAPES]

    kw = dict(lr=1e-2, weight_decay=0.01)
    straight = fresh()
    opt = FusedLAMB(straight, **kw)
    for s in range(ITERS):
        for p, g in zip(straight, grads(s)):
            p.grad = g
        opt.step()

    first = fresh()
    opt1 = FusedLAMB(first, **kw)
    for s in range(3):
        for p, g in zip(first, grads(s)):
            p.grad = g
        opt1.step()
    saved = opt1.state_dict()
    assert saved["param_groups"][0]["step"] == 3
    assert set(saved["state"][0]) == {"exp_avg", "exp_avg_sq"}
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2 = FusedLAMB(resumed, lr=0.5)  # hyper-parameters come from the state dict
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == 1e-2
    for p in resumed:
        assert opt2.state[p]["exp_avg"].dtype == torch.float32
    for s in range(3, ITERS):
        for p, g in zip(resumed, grads(s)):
            p.grad = g
        opt2.step()
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)


def test_errors():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(RuntimeError, match="FusedLAMB does not support the AMSGrad variant."):
        FusedLAMB([p], amsgrad=True)
    for bad in (dict(lr=-1.0), dict(eps=-1e-6), dict(weight_decay=-0.1), dict(max_grad_norm=-1.0),
                dict(betas=(1.0, 0.999)), dict(betas=(0.9, -0.1))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FusedLAMB([p], **bad)
    with pytest.raises(TypeError, match="betas"):
        FusedLAMB([p], betas=0.9)
    d = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    d.grad = torch.ones(2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="only support fp16, bf16 and fp32"):
        FusedLAMB([d]).step()
    s = torch.nn.Parameter(torch.ones(3))
    s.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        FusedLAMB([s]).step()


def test_defaults_and_zero_grad():
    p = torch.nn.Parameter(torch.ones(2))
    opt = FusedLAMB([p])
    d = opt.defaults
    assert (d["lr"], d["bias_correction"], d["betas"], d["eps"], d["weight_decay"], d["grad_averaging"],
            d["max_grad_norm"]) == (1e-3, True, (0.9, 0.999), 1e-6, 0.01, True, 1.0)
    assert (opt.adam_w_mode, opt.set_grad_none, opt.use_nvlamb) == (1, True, False)
    p.grad = torch.ones(2)
    opt.zero_grad()
    assert p.grad is None
    opt2 = FusedLAMB([p], set_grad_none=False)
    p.grad = torch.ones(2)
    opt2.zero_grad()
    assert torch.equal(p.grad, torch.zeros(2))


def test_closure_returns_loss():
    p = torch.nn.Parameter(torch.ones(2))
    opt = FusedLAMB([p])

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 2.0
    assert not torch.equal(p.detach(), torch.ones(2))


def test_norm_hooks_are_the_single_path(monkeypatch):
    # FusedLAMB takes every norm through these two functions (moreh_ap.optim.norms).
    calls = {"global": 0, "per": 0}
    real_global, real_per = fused_lamb_module.total_norm, fused_lamb_module.per_tensor_norms

    def fake_global(grads):
        calls["global"] += 1
        return real_global(grads) * 0 + 1e6  # pretend other shards hold a huge gradient

    def counting_per(tensors):
        calls["per"] += 1
        return real_per(tensors)

    monkeypatch.setattr(fused_lamb_module, "total_norm", fake_global)
    monkeypatch.setattr(fused_lamb_module, "per_tensor_norms", counting_per)
    kw = dict(HYPER, weight_decay=0.0, use_nvlamb=False)
    p = torch.nn.Parameter(torch.ones(4))
    opt = FusedLAMB([p], **kw)
    p.grad = torch.ones(4)
    opt.step()
    assert calls == {"global": 1, "per": 0}  # wd 0, no nvlamb: no per-tensor norms needed
    # with clip = 1e6 the gradient is ~0 and the first step moves p by lr * (g/clip)/(|g/clip|+eps)
    ref = torch.nn.Parameter(torch.ones(4))
    ref_opt = RefLAMB([ref], **kw)
    ref.grad = torch.full((4,), 1e-6)
    ref_opt.step()
    torch.testing.assert_close(p.detach(), ref.detach())
    opt2 = FusedLAMB([p], weight_decay=0.01)
    p.grad = torch.ones(4)
    opt2.step()
    assert calls["per"] == 2  # ||p|| and ||u||, one call each for the bucket


def test_aliases_after_import():
    import moreh_ap

    assert moreh_ap.optim.FusedLAMB is FusedLAMB
    assert torch.moreh.FusedLAMB is FusedLAMB
    assert torch.ops.moreh.FusedLAMB is FusedLAMB


_REPO = str(REPO_ROOT)
# Run the worktree's start-up hook (not the installed one) in a fresh interpreter, then `code`.
_WITH_REPO_HOOK = (
    "import sys, importlib.util\n"
    "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '_moreh_ap_hook', False)]\n"
    "spec = importlib.util.spec_from_file_location('_moreh_ap_hook', 'hook/_moreh_ap_hook.py')\n"
    "hook = importlib.util.module_from_spec(spec); sys.modules['_moreh_ap_hook'] = hook\n"
    "spec.loader.exec_module(hook)\n"
)


def _python(code):
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=_REPO)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_torch_ops_alias_lazy_then_real_in_fresh_interpreter():
    # With the worktree's start-up hook: `import torch` alone gives a lazy torch.ops.moreh.FusedLAMB
    # (moreh_ap not imported yet); calling it imports moreh_ap, which installs the real class there.
    out = _python(
        _WITH_REPO_HOOK
        + "import torch\n"
        "lazy = torch.ops.moreh.FusedLAMB\n"
        "print('moreh_ap' in sys.modules, type(lazy).__name__)\n"
        "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)\n"
        "opt = lazy([p], lr=0.001); opt.step()\n"  # the seed's spelling, with only `import torch`
        "print('moreh_ap' in sys.modules, type(opt).__module__)\n"
        "import moreh_ap\n"
        "print(torch.ops.moreh.FusedLAMB is moreh_ap.optim.FusedLAMB, torch.moreh.FusedLAMB is moreh_ap.FusedLAMB,"
        " isinstance(torch.ops.moreh.FusedLAMB([p]), torch.optim.Optimizer))\n"
    )
    assert out == ["False", "_LazyFusedLAMB", "True", "moreh_ap.optim.fused_lamb", "True", "True", "True"]


def test_start_up_hook_without_torch_import_stays_cheap():
    out = _python(_WITH_REPO_HOOK + "print('torch' in sys.modules, 'moreh_ap' in sys.modules)\n")
    assert out == ["False", "False"]


@pytest.mark.parametrize("wd", [0.0, 0.01])
@pytest.mark.parametrize("adam_w_mode", [True, False])
def test_device_clip_path(monkeypatch, wd, adam_w_mode):
    # On accelerators the clip factor stays a device tensor (no host sync): exercise that path on CPU.
    monkeypatch.setattr(fused_lamb_module, "_clip_on_host", lambda clip: False)
    kw = dict(HYPER, weight_decay=wd, adam_w_mode=adam_w_mode)
    _run(MULTI_SHAPES, grad_scale=[0.01, 1.0, 20.0], ref_kw=dict(kw, use_nvlamb=True), tst_kw=dict(kw, use_nvlamb=True))


def test_cpu_chunking_matches_one_launch(monkeypatch):
    # The CPU path takes the tensors a cache-sized chunk at a time; the result must not depend on it.
    shapes = [(64, 32), (64,), (3,), (64, 48), (323, 16), (1,), (7, 7)]
    results = []
    for chunk in (1 << 62, 1000, 1):
        monkeypatch.setattr(fused_lamb_module, "CPU_CHUNK_NUMEL", chunk)
        _, tst_p, _ = _run(shapes, grad_scale=ALTERNATING, ref_kw=dict(HYPER, weight_decay=0.01),
                           tst_kw=dict(HYPER, weight_decay=0.01, use_nvlamb=True), iters=3)
        results.append(tst_p)
    assert fused_lamb_module._chunks([torch.zeros(600), torch.zeros(600), torch.zeros(5)], 1000) == [(0, 1), (1, 3)]
    assert fused_lamb_module._chunks([torch.zeros(5)] * 3, 1) == [(0, 1), (1, 2), (2, 3)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_grad_norm_fn_is_explicit():
    # A ParallelModel on several ranks gives FusedLAMB its global norm through set_grad_norm_fn; None
    # from the function (parameters not the model's) falls back to this process's norm.
    seen = []

    def fn(params):
        seen.append(len(params))
        return torch.tensor(1e6)

    kw = dict(HYPER, weight_decay=0.0, use_nvlamb=False)
    p, q = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt = FusedLAMB([p], grad_norm_fn=fn, **kw)
    plain = FusedLAMB([q], **kw)
    p.grad, q.grad = torch.ones(4), torch.ones(4)
    opt.step()
    plain.step()
    assert seen == [1] and not torch.equal(p.detach(), q.detach())  # clip by 1e6: a different step
    r = torch.nn.Parameter(torch.ones(4))
    opt2 = FusedLAMB([r], **kw)
    opt2.set_grad_norm_fn(lambda params: None)
    r.grad = torch.ones(4)
    opt2.step()
    torch.testing.assert_close(r.detach(), q.detach())
    with pytest.raises(TypeError, match="callable"):
        opt2.set_grad_norm_fn(3)
