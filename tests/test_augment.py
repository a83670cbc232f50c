import pytest
import torch

from training.data.augment import PRESETS, BatchAugment, night_view


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_keep_shape_and_range(preset):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 24, 20), dtype=torch.uint8)
    y = BatchAugment(preset)(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 255
    if preset == "none":
        torch.testing.assert_close(y, x.float())
    else:
        assert not torch.allclose(y, x.float())


def test_night_preset_darkens_some_images_strongly():
    torch.manual_seed(0)
    x = torch.full((256, 3, 8, 8), 160, dtype=torch.uint8)
    means = BatchAugment("night")(x).mean(dim=(1, 2, 3))
    assert (means < 80).float().mean() > 0.2 and (means > 120).any()


def test_night_view_is_dark_blue_and_deterministic():
    x = torch.full((1, 3, 4, 4), 150, dtype=torch.uint8)
    v = night_view(x)
    assert torch.equal(v, night_view(x))
    r, g, b = v[0, :, 0, 0].tolist()
    assert b > r and max(r, g, b) < 100


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="'sunny'"):
        BatchAugment("sunny")
