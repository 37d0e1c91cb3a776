# The planner's speed-ups plan the same: early rejections are sound, partitions and configs are unchanged.
import random

import pytest
import torch

from moreh_ap.config import ParallelConfig
from moreh_ap.graph import trace
from moreh_ap.planner import Cluster, enumerate_candidates, plan_graph
from moreh_ap.planner import planning
from moreh_ap.planner.evaluator import EARLY_REJECTION, Evaluator, with_boundaries
from moreh_ap.planner.partition import _fits, _fits_fast, _runs, linear_partition
from moreh_ap.planner.tp import tp_degrees, tp_facts

pytestmark = pytest.mark.timeout(120)
GIB = 1024**3


@pytest.fixture(scope="module")
def meta_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=512, n_layer=12, n_head=8, vocab_size=8192, n_positions=256, use_cache=False,
                     bos_token_id=0, eos_token_id=0)
    with torch.device("meta"):
        model = GPT2LMHeadModel(cfg)
    ids = torch.empty(64, 256, dtype=torch.long, device="meta")
    return model, trace(model, (ids,), {"labels": ids})


def _cluster(gib: float) -> Cluster:
    return Cluster.preset("a100-80gb", nodes=2, devices_per_node=8).with_(device_memory=int(gib * GIB))


@pytest.mark.parametrize("gib", [0.5, 1.0])
def test_early_rejections_are_sound_and_what_fits_is_exact(meta_gpt2, gib):
    model, graph = meta_gpt2
    cluster, facts = _cluster(gib), tp_facts(model)
    configs = enumerate_candidates(world_size=16, global_batch=64, num_blocks=graph.num_blocks,
                                   tp_degrees=tp_degrees(facts, devices_per_node=8, world_size=16))
    kw = dict(world=16, optimizer="adamw", cap=int(cluster.device_memory * 0.8), tp=facts)
    fast, full = Evaluator(graph, cluster, early=True, **kw), Evaluator(graph, cluster, early=False, **kw)
    probed = fits = 0
    for cfg in configs:
        a, b = fast.compile(cfg), full.compile(cfg)
        assert a.feasible == b.feasible, cfg
        if a.feasible or not (a.reason or "").startswith(EARLY_REJECTION):
            assert a.to_dict() == b.to_dict(), cfg  # evaluated in full: the very same numbers
            fits += a.feasible
        else:  # a lower bound of the exact peak
            assert a.memory.total <= b.memory.total and a.memory.total > kw["cap"], cfg
            probed += "pipeline rank" in a.reason
    assert probed > 20 and fits > 20  # both kinds of candidates are exercised


def test_plan_is_the_same_without_early_rejections(meta_gpt2, monkeypatch):
    model, graph = meta_gpt2
    cluster, facts = _cluster(1.0), tp_facts(model)
    fast = plan_graph(graph, cluster=cluster, tp=facts, use_measurements=False)
    monkeypatch.setattr(planning, "Evaluator", lambda *a, **k: Evaluator(*a, **{**k, "early": False}))
    full = plan_graph(graph, cluster=cluster, tp=facts, use_measurements=False)
    assert fast.selected.to_dict() == full.selected.to_dict()
    assert [c.feasible for c in fast.candidates] == [c.feasible for c in full.candidates]
    assert [c.to_dict() for c in fast.candidates if c.feasible] == [c.to_dict() for c in full.candidates if c.feasible]
    assert sum(EARLY_REJECTION in (c.reason or "") for c in fast.candidates) > sum(
        EARLY_REJECTION in (c.reason or "") for c in full.candidates)


def test_measurements_turn_early_rejections_off(meta_gpt2, monkeypatch):
    model, graph = meta_gpt2
    seen = []

    def spy(*a, **k):
        seen.append(k["early"])
        return Evaluator(*a, **k)

    monkeypatch.setattr(planning, "Evaluator", spy)
    plan_graph(graph, cluster=_cluster(2.5), tp=tp_facts(model), use_measurements=False)
    monkeypatch.setattr(planning, "load_measurements", lambda device, model: ["a measurement"])
    monkeypatch.setattr(planning, "learn_and_correct", lambda cands, **kw: None)
    plan_graph(graph, cluster=_cluster(2.5), tp=tp_facts(model), use_measurements=True)
    assert seen == [True, False]


def _previous_linear_partition(weights, k):
    """linear_partition before the stage-at-a-time search (the reference)."""

    def fits(limit):
        n, bounds, acc = len(weights), [], 0.0
        for i, w in enumerate(weights):
            left = k - len(bounds) - 1
            if i > 0 and left > 0 and (acc + w > limit or n - i == left):
                bounds.append(i)
                acc = 0.0
            acc += w
            if acc > limit * (1 + 1e-12):
                return None
        return bounds if len(bounds) == k - 1 else None

    def bottleneck(bounds):
        edges = [0, *bounds, len(weights)]
        return max(sum(weights[a:b]) for a, b in zip(edges, edges[1:]))

    if k == 1:
        return ()
    lo, hi = max(weights), sum(weights)
    best = fits(hi)
    for _ in range(60):
        if hi - lo <= 1e-9 * max(hi, 1e-30):
            break
        mid = (lo + hi) / 2
        cand = fits(mid)
        if cand is not None:
            best, hi = cand, mid
        else:
            lo = mid
    bounds = tuple(best if best is not None else fits(float("inf")))
    n = len(weights)
    even = tuple(i * (n // k) + min(i, n % k) for i in range(1, k))
    return even if bottleneck(even) <= bottleneck(bounds) * (1 + 1e-9) else bounds


def test_partition_is_the_previous_one():
    rng = random.Random(0)
    for trial in range(160):
        n = rng.randint(2, 32)
        kind = trial % 4
        if kind == 0:
            w = [rng.randint(0, 9) for _ in range(n)]
        elif kind == 1:
            w = [rng.random() for _ in range(n)]
        elif kind == 2:  # identical blocks above 2**53, a heavier first and last (an embedding, a head)
            w = [3 * 10**16 + 7] * n
            w[0] += rng.randint(0, 10**16)
            w[-1] += rng.randint(0, 10**16)
        else:
            w = [rng.choice([0.0, 1e-3, 0.1, 0.3, 1.0, 1e12]) for _ in range(n)]
        w[0] = w[0] or 1
        for k in range(1, n + 1):
            assert linear_partition(w, k) == _previous_linear_partition(w, k), (w, k)
        runs = _runs(tuple(w))
        for k in range(1, n + 1):
            for _ in range(3):  # on exact sums of contiguous blocks too, where the packer's ties are
                a = rng.randint(0, n - 1)
                limit = max(float(sum(w[a:rng.randint(a + 1, n)])), float(max(w)))
                for lim in (limit, limit * (1 - 1e-13), rng.uniform(limit, sum(w))):
                    assert _fits_fast(runs, k, lim) == (_fits(w, k, lim) is not None), (w, k, lim)


def test_with_boundaries_is_replace():
    cfg = ParallelConfig(num_stages=4, num_micro_batches=8, batch_per_device=2, tp=2, recomputation=True,
                         distribute_param=True, schedule="Interleaved1F1B", stages_per_rank=2)
    a, b = with_boundaries(cfg, (1, 2, 4, 5, 6, 8, 9)), cfg.replace(boundaries=(1, 2, 4, 5, 6, 8, 9))
    assert a == b and hash(a) == hash(b) and a.to_dict() == b.to_dict() and cfg.boundaries is None


def test_pool_map_keeps_the_order():
    items = list(range(37))
    for workers in (1, 3, 16, 64):
        assert planning._pool_map(lambda x: x * x, items, workers) == [x * x for x in items]
