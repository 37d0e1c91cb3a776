# What lets pipelines run on torch 2.11 as on 2.13: positional inputs on the first stage only, no integer activations.
"""torch 2.11's ``PipelineStage`` refuses positional inputs on a later stage ("Can't supply input args for shape
inference on non-first stage") and makes every tensor a stage receives require grad (an integer attention mask
cannot); torch 2.13 ignores the first and skips the second. These single-process checks pin down the parts that
keep both versions working; the multi-rank equivalence tests run the pipelines themselves.
"""
from __future__ import annotations

import pytest
import torch

from moreh_ap.config import ParallelConfig
from moreh_ap.errors import InputError
from moreh_ap.layout import ParallelLayout, stage_ranges
from moreh_ap.models import find_adapter
from moreh_ap.runtime.apply import Stage, Wrapper
from moreh_ap.runtime.inputs import prepare_inputs
from moreh_ap.runtime.steps import LossSource, StepRunner
from tests.helpers.runtime_cases import N_BLOCKS, build_model

pytestmark = pytest.mark.timeout(120)


def _padded_batch(vocab: int, *, n: int = 3, seq: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[0, :4] = 0  # left padding: the mask changes every stage's attention
    mask[1, -3:] = 0
    return ids, mask


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_hf_stages_send_only_hidden_states_and_read_the_mask_keyword(kind):
    """Every stage takes the micro-batch's mask as a keyword and sends one float tensor on: the chain equals the
    model's own masked forward (a stage that ignored the mask would differ on the padded rows)."""
    model = build_model(kind, 0).eval()
    adapter = find_adapter(model)
    ids, mask = _padded_batch(model.config.vocab_size)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        unmasked = model(ids).logits
        h = ids
        ranges = stage_ranges(N_BLOCKS, 3, None)
        for s, (lo, hi) in enumerate(ranges):
            stage, _ = adapter.build_stage(lo, hi, first=s == 0, last=s == len(ranges) - 1)
            h = stage(h, attention_mask=mask)
            assert isinstance(h, torch.Tensor) and h.is_floating_point()
    keep = mask.bool()
    torch.testing.assert_close(h[keep], full[keep], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(h[0][keep[0]], unmasked[0][keep[0]], atol=1e-4)  # the mask mattered


def test_pipelined_hf_call_takes_the_mask_as_a_keyword_only():
    ids, mask = _padded_batch(64)
    common = dict(hf_model=True, pipelined=True, has_loss_fn=False)
    ok = prepare_inputs((ids,), None, {"attention_mask": mask, "labels": ids}, **common)
    assert ok.args == (ids,) and set(ok.kwargs) == {"attention_mask"}
    with pytest.raises(InputError, match="attention_mask=... .*as keywords"):  # names unknown: refused
        prepare_inputs((ids, mask), None, {"labels": ids}, **common)
    # the model's own parameter names known (the engine passes the adapter's): bound to the keyword
    names = ("input_ids", "attention_mask", "position_ids", "labels")
    bound = prepare_inputs((ids, mask), None, {"labels": ids}, arg_names=names, **common)
    assert bound.args == (ids,) and bound.kwargs["attention_mask"] is mask and bound.target is ids
    bound = prepare_inputs((ids, mask, None, ids), None, {}, arg_names=names, **common)  # labels positional too
    assert bound.args == (ids,) and bound.kwargs["attention_mask"] is mask and bound.target is ids
    with pytest.raises(InputError, match="'attention_mask' twice"):
        prepare_inputs((ids, mask), None, {"attention_mask": mask, "labels": ids}, arg_names=names, **common)
    # without a pipeline the positional mask goes to the model's own forward as before
    assert prepare_inputs((ids, mask), None, {"labels": ids}, hf_model=True, pipelined=False,
                          has_loss_fn=False).args == (ids, mask)


def _runner(stages: list[Stage]) -> StepRunner:
    cfg = ParallelConfig(num_stages=2, num_micro_batches=2, batch_per_device=2, mixed_precision=False)
    loss = LossSource(hf_model=False, hf_loss=None, vocab_size=None, loss_fn=None)
    return StepRunner(stages, config=cfg, layout=ParallelLayout.from_config(cfg, 2), dp_rank=0,
                      device=torch.device("cpu"), wrapper=Wrapper.NONE, pp_group=None, loss=loss,
                      after_backward=lambda: None)


def test_positional_inputs_go_to_the_schedule_on_the_first_stages_rank_only():
    x = torch.zeros(4, 3)
    first = Stage(0, torch.nn.Identity(), None, True, False)
    middle = Stage(1, torch.nn.Identity(), None, False, False)
    last = Stage(3, torch.nn.Identity(), None, False, True)
    assert _runner([first, Stage(2, torch.nn.Identity(), None, False, False)])._stage_args((x,)) == (x,)
    assert _runner([middle, last])._stage_args((x,)) == ()


def test_a_gather_of_uneven_shards_is_contiguous_on_every_torch():
    """torch 2.11 left the cut of a padded all-gather non-contiguous (a linear's view on it failed); after
    ``contiguous_uneven_gathers`` every supported torch gives a contiguous cut with the same values."""
    from torch.distributed.tensor.placement_types import Shard

    from moreh_ap.compat import contiguous_uneven_gathers

    contiguous_uneven_gathers()
    gathered = torch.arange(2 * 10 * 4, dtype=torch.float32).reshape(2, 10, 4)  # 9 positions padded to 2 x 5
    cut = Shard(1)._maybe_unpad_tensor(gathered, 9, 2)
    assert cut.shape == (2, 9, 4) and cut.is_contiguous()
    torch.testing.assert_close(cut, gathered[:, :9], rtol=0, atol=0)
    assert cut.view(18, 4).shape == (18, 4)  # the view a linear takes
    even = Shard(1)._maybe_unpad_tensor(gathered, 10, 2)
    assert even.is_contiguous() and torch.equal(even, gathered)
