import numpy as np
import pytest
import torch

from conftest import SAMPLE
from training.data.vehicles import load_images, split_vehicles
from training.engine import fit_temperature, head_logits
from training.features import cached_head_inputs, head_inputs
from training.metrics import expected_calibration_error, reliability_bins
from training.nets import build_classifier


def _sample(size: int):
    split = split_vehicles(SAMPLE / "vehicles")
    images, _ = load_images(split.train[:10], (size, size))
    return [s.path for s in split.train[:10]], torch.from_numpy(images)


@pytest.fixture
def sample_images():
    return _sample(32)


def _net(seed: int = 0):
    torch.manual_seed(seed)
    return build_classifier("cnn", 3, (32, 32), "per-image", depth=2, width=8).eval()


def test_head_inputs_are_the_final_layers_view_of_each_image_and_its_mirror(sample_images):
    _, images = sample_images
    model = _net()
    features = head_inputs(model, images, torch.device("cpu"), batch_size=4)
    assert features.shape[:2] == (2, 10)
    torch.testing.assert_close(features[1], head_inputs(model, images.flip(-1), torch.device("cpu"))[0])
    model.temperature.fill_(2.0)
    with torch.no_grad():
        torch.testing.assert_close(head_logits(model, features[0]), model(images))


def test_the_feature_cache_is_keyed_by_the_backbone_not_the_head(sample_images, tmp_path):
    paths, images = sample_images
    model = _net()
    first = cached_head_inputs(model, paths, images, torch.device("cpu"), str(tmp_path))
    (store,) = tmp_path.glob("*.npz")
    written = store.stat().st_mtime_ns
    torch.nn.init.normal_(model.backbone.fc.weight)  # a refitted head: same features, nothing recomputed
    again = cached_head_inputs(model, paths[::-1], images.flip(0), torch.device("cpu"), str(tmp_path))
    torch.testing.assert_close(again, first.flip(1))
    assert store.stat().st_mtime_ns == written
    other = _net(seed=1)  # another backbone: another entry, its own features
    cached_head_inputs(other, paths[:3], images[:3], torch.device("cpu"), str(tmp_path))
    assert len(list(tmp_path.glob("*.npz"))) == 2
    torch.testing.assert_close(first, head_inputs(model, images, torch.device("cpu")))


def test_calibration_error_and_reliability_bins():
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])
    # bin of 0.9: accuracy 0.5 (gap 0.4); bin of 0.6: accuracy 1.0 (gap 0.4)
    assert expected_calibration_error(probabilities, labels, bins=10) == pytest.approx(0.4)
    table = reliability_bins(probabilities, labels, bins=10)
    assert [b["count"] for b in table if b["count"]] == [2, 2]


def test_the_fitted_temperature_undoes_overconfidence():
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 3, generator=generator) * 2
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=generator).squeeze(1)
    temperature = fit_temperature(true_logits * 3, labels)  # three times too confident
    assert temperature == pytest.approx(3.0, rel=0.1)
    before = expected_calibration_error(torch.softmax(true_logits * 3, 1).numpy(), labels.numpy())
    after = expected_calibration_error(torch.softmax(true_logits * 3 / temperature, 1).numpy(), labels.numpy())
    assert after < before / 2


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_the_imagenet_prior_head_adds_the_grouped_imagenet_evidence_and_a_probe_fits_around_it(variant):
    import timm

    from training.engine import fit_linear_probe
    from training.nets.pretrained import IMAGENET_GROUPS, LITE_IMAGE_SIZES, _imagenet_state

    _, images = _sample(64)  # at 32 px the larger variants' features are all zero: nothing to fit
    name = f"efficientnet_lite{variant}"
    assert timm.models.get_pretrained_cfg(name).input_size == (3, LITE_IMAGE_SIZES[variant], LITE_IMAGE_SIZES[variant])
    model = build_classifier(name, 3, (64, 64), "centered", imagenet_prior=1.0).eval()
    head = model.backbone.classifier
    features = head_inputs(model, images, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(head_logits(model, features[0]), model(images), rtol=1e-4, atol=1e-4)
        imagenet = timm.create_model(name, pretrained=False)
        imagenet.load_state_dict(_imagenet_state(variant, imagenet.state_dict()))
        probabilities = torch.softmax(imagenet.classifier(features[0]), 1)  # the full 1000-class ImageNet head
        grouped = torch.stack([probabilities[:, list(g)].sum(1) for g in IMAGENET_GROUPS.values()], 1)
        torch.testing.assert_close(torch.softmax(head.logit_offset(features[0]), 1), grouped / grouped.sum(1, keepdim=True),
                                   rtol=1e-4, atol=1e-5)
    imagenet_before = head.imagenet.weight.clone()
    labels = torch.arange(10) % 3
    fit_linear_probe(model, features, labels, l2=1e6, device=torch.device("cpu"))  # so strong: the prior alone
    assert head.fc.weight.abs().max() < 1e-3
    torch.testing.assert_close(head.imagenet.weight, imagenet_before)
    prior_loss = torch.nn.functional.cross_entropy(head_logits(model, features[0]), labels)
    fit_linear_probe(model, features, labels, l2=1e-3, device=torch.device("cpu"))  # weak: fits the labels
    assert torch.nn.functional.cross_entropy(head_logits(model, features[0]), labels) < prior_loss - 0.1


def test_a_stack_of_backbones_fits_one_head_on_their_features_side_by_side_around_their_averaged_priors():
    import torch.nn.functional as F

    from training.engine import fit_linear_probe

    _, images = _sample(64)
    stack = build_classifier("efficientnet_lite_stack", 3, (64, 64), "centered", imagenet_prior=1.0, variants=[0, 1]).eval()
    singles = [build_classifier(f"efficientnet_lite{v}", 3, (64, 64), "centered", imagenet_prior=1.0).eval() for v in (0, 1)]
    cpu = torch.device("cpu")
    features = head_inputs(stack, images, cpu)
    # each backbone sees the image at its own ImageNet size (224, 240 px), resized in the graph
    alone = [head_inputs(net, F.interpolate(images.float(), size=(size, size), mode="bilinear"), cpu)
             for net, size in zip(singles, (224, 240))]
    torch.testing.assert_close(features, torch.cat(alone, dim=-1), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(head_logits(stack, features[0]), stack(images), rtol=1e-4, atol=1e-4)
        averaged = sum(net.backbone.classifier.logit_offset(f[0]) for net, f in zip(singles, alone)) / 2
        torch.testing.assert_close(stack.backbone.classifier.logit_offset(features[0]), averaged, rtol=1e-4, atol=1e-4)
    labels = torch.arange(10) % 3
    fit_linear_probe(stack, features, labels, l2=1e-3, device=cpu)
    assert (head_logits(stack, features[0]).argmax(1) == labels).all()
    for variants in ([0], [1, 1], [0, 3]):
        with pytest.raises(ValueError, match="two or more different ones"):
            build_classifier("efficientnet_lite_stack", 3, (64, 64), "centered", variants=variants)


def test_fine_tuning_leaves_the_imagenet_prior_as_imagenet_trained_it():
    from training.engine import freeze_all_but_head

    model = build_classifier("efficientnet_lite0", 3, (64, 64), "centered", imagenet_prior=1.0)
    head = model.backbone.classifier
    for frozen in (True, False):  # head-only epochs, then the whole network (LP-FT)
        freeze_all_but_head(model, frozen=frozen)
        assert head.fc.weight.requires_grad and not head.imagenet.weight.requires_grad
        assert model.backbone.conv_stem.weight.requires_grad is not frozen


def test_centered_normalisation_maps_uint8_to_minus_one_one():
    from training.nets.classifier import InputNormalization

    x = torch.tensor([0, 255, 127.5]).view(1, 3, 1, 1)
    torch.testing.assert_close(InputNormalization("centered")(x).flatten(), torch.tensor([-1.0, 1.0, 0.0]))


def test_the_cache_key_ignores_the_head_and_its_prior_but_not_the_normalisation():
    from training.features import backbone_key

    key = lambda **options: backbone_key(build_classifier("efficientnet_lite0", 3, (64, 64), **options), 64)  # noqa: E731
    plain = key(normalization="centered")
    assert key(normalization="centered", imagenet_prior=2.0) == plain == key(normalization="centered", imagenet_prior=0.5)
    assert key(normalization="equalize-gray") != plain
