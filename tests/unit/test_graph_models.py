# The small test models run for real (forward, loss) before the planner and graph tests rely on them.
import torch

from tests.helpers.models import TinyGPT, mlp, tiny_gpt2, tiny_llama, tiny_neox


def test_tiny_models_run_for_real():
    idx = torch.randint(0, 100, (2, 16))
    assert TinyGPT()(idx, idx).dim() == 0
    assert mlp()(torch.randn(3, 16)).shape == (3, 16)
    assert tiny_llama(2)(idx, labels=idx).loss.dim() == 0
    assert tiny_gpt2(2)(idx, labels=idx).loss.dim() == 0
    assert tiny_neox(2)(idx, labels=idx).loss.dim() == 0
