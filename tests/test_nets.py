import pytest
import torch

from training.nets import build_classifier, count_parameters, get_model, list_models, model_options
from training.nets.classifier import InputNormalization
from training.nets.cnn import check_hdc, receptive_field
from training.nets.resnet import BasicBlock


@pytest.mark.parametrize("name", list_models("classify"))
@pytest.mark.parametrize("size", [64, 96])
def test_every_classifier_gives_one_logit_per_class(name, size):
    model = build_classifier(name, 3, (size, size)).eval()
    x = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    with torch.no_grad():
        assert model(x).shape == (2, 3)
    assert count_parameters(model) > 0


def test_alexnet_adapts_to_a_large_input():
    model = build_classifier("alexnet", 5, (192, 160)).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 192, 160)).shape == (1, 5)


def test_resnet18_and_plain18_share_depth_and_differ_only_by_shortcuts():
    res, plain = get_model("resnet18"), get_model("plain18")
    convs = lambda m: [c for c in m.modules() if isinstance(c, torch.nn.Conv2d) and c.kernel_size != (1, 1)]  # noqa: E731
    assert len(convs(res)) == len(convs(plain)) == 17  # + the linear layer = 18 weighted layers
    shortcuts = [b.shortcut for b in res.modules() if isinstance(b, BasicBlock)]
    assert sum(isinstance(s, torch.nn.Sequential) for s in shortcuts) == 3  # 1x1 projections where shape changes
    assert count_parameters(res) - count_parameters(plain) == sum(count_parameters(s) for s in shortcuts)


def test_hdc_accepts_the_lab_rates_and_rejects_gridding():
    check_hdc([1, 2, 5])
    with pytest.raises(ValueError, match="common factor 2"):
        check_hdc([2, 4, 6])
    with pytest.raises(ValueError, match="M_2"):
        check_hdc([1, 2, 9])
    with pytest.raises(ValueError, match="common factor 2"):
        get_model("dilated_cnn", rates=(2, 2, 2))
    get_model("dilated_cnn", rates=(2, 2, 2), enforce_hdc=False)  # admitted for the comparison
    assert receptive_field([1, 2, 5]) == 17 and receptive_field([1, 1, 1]) == 7


def test_registry_names_the_problem():
    with pytest.raises(ValueError, match="unknown network 'resnet19'"):
        get_model("resnet19")
    with pytest.raises(ValueError, match="no option"):
        get_model("cnn", depth=3, colour=True)
    assert "depth" in model_options("cnn")


def test_per_image_normalisation_ignores_exposure():
    norm = InputNormalization("per-image")
    x = torch.rand(1, 3, 8, 8) * 200
    torch.testing.assert_close(norm(x), norm(x * 0.3), atol=1e-2, rtol=1e-2)
    assert not torch.allclose(InputNormalization("scale")(x), InputNormalization("scale")(x * 0.3))


def test_equalize_normalisation_ignores_order_preserving_exposure_and_colour_casts():
    torch.manual_seed(0)
    x = torch.randint(0, 100, (2, 3, 12, 12)).float() * 2  # even values, so halving merges none
    # a tint, as at night: red lifted, green kept, blue halved (each order-preserving per channel)
    y = torch.stack([x[:, 0] + 50, x[:, 1], x[:, 2] / 2], dim=1)
    norm = InputNormalization("equalize")
    torch.testing.assert_close(norm(x), norm(y))
    assert abs(norm(x).mean().item()) < 1e-5 and abs(norm(x).std().item() - 1) < 0.05


def test_the_nets_command_lists_every_network_in_aligned_columns(capsys):
    from training import cli

    assert cli.main(["nets", "--image-size", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == list_models()
    assert len({line.index(f" {line.split()[1]} ") for line in lines}) == 1  # the task column starts in one place
