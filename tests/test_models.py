import pytest
import torch
from torch import nn

from flwr_select.models import MODELS, Standardize, build_model


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_lenet5_has_the_classic_layout():
    model = build_model("lenet5")
    # conv 6*(25+1) + conv 16*(6*25+1) + fc 400*120+120 + 120*84+84 + 84*10+10
    assert count(model) == 156 + 2416 + 48120 + 10164 + 850
    for shape in ((4, 28, 28), (4, 1, 28, 28)):
        assert model(torch.zeros(shape, dtype=torch.uint8)).shape == (4, 10)


def test_cifar_cnn_matches_the_paper_reference():
    model = build_model("cifar-cnn")
    # conv 64*(75+1) + conv 64*(64*25+1) + fc 4096*384+384 + 384*192+192 + 192*10+10
    assert count(model) == 4864 + 102464 + 1573248 + 73920 + 1930
    assert model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 10)


def test_a_seed_gives_the_same_weights_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = build_model("lenet5", seed=5), build_model("lenet5", seed=5)
    assert torch.rand(1) == before
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)


def test_standardize_maps_uint8_to_standard_scores():
    s = Standardize((0.5,), (0.25,))
    x = torch.tensor([[[0, 255]]], dtype=torch.uint8)  # (1, 1, 2)
    # (0/255 - 0.5) / 0.25 = -2 ; (255/255 - 0.5) / 0.25 = 2
    assert s(x).tolist() == [[[[-2.0, 2.0]]]]


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet")
    assert sorted(MODELS) == ["cifar-cnn", "lenet5", "lenet5-wide"]


def test_the_wide_lenet_is_the_same_family_with_more_maps_and_dropout():
    # Prepare
    wide, classic = build_model("lenet5-wide", seed=0), build_model("lenet5", seed=0)
    batch = torch.zeros(3, 28, 28, dtype=torch.uint8)
    # Assert: the same layout (two 5x5 conv layers, pooling), wider, with dropout
    convs = [m for m in wide.features if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [
        (32, (5, 5)),
        (64, (5, 5)),
    ]
    assert any(isinstance(m, nn.Dropout) for m in wide.classifier)
    assert not any(isinstance(m, nn.Dropout) for m in classic.classifier)
    assert wide(batch).shape == classic(batch).shape == (3, 10)
    # the classic LeNet-5 keeps its parameter count (and its checkpoints' keys)
    assert sum(p.numel() for p in classic.parameters()) == 61_706
