

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
    assert even.data_ptr() == gathered.data_ptr()  # nothing to cut: no copy
