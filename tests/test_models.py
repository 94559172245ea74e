"""The paper's models build, run and train with BSAM."""
import pytest
import torch
import torch.nn.functional as F

from bsam_fast import BSAM
from bsam_fast.experiments.models import FRN, INPUT_SHAPES, MODELS, make_model

SIZES = {"mlp": 784 * 500 + 500 + 500 * 300 + 300 + 300 * 10 + 10, "lenet5": 61706, "resnet20_frn": 273258}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_shapes_and_a_bsam_step(name):
    torch.manual_seed(0)
    model = make_model(name)
    x = torch.randn(2, *INPUT_SHAPES[name])
    assert model(x).shape == (2, 10)
    if name in SIZES:
        assert sum(p.numel() for p in model.parameters()) == SIZES[name]
    opt = BSAM(model.parameters(), lr=1e-3, num_data=100)
    y = torch.tensor([1, 7])
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    assert torch.isfinite(opt.step(closure))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_frn_normalises_each_channel_without_batch_statistics():
    frn = FRN(3)
    x = torch.randn(4, 3, 5, 5) * 7
    y = frn(x)
    nu2 = (x ** 2).mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(y, torch.maximum(x / torch.sqrt(nu2 + 1e-6), torch.zeros(())))
    frn.eval()
    torch.testing.assert_close(frn(x), y)


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        make_model("vgg")
