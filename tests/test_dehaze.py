import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from conftest import FULL_DATA, SAMPLE, tiny_dehaze_config
from training.cli import main
from training.config import DehazeBaselineConfig
from training.data.dehaze import load_pair, load_pairs, random_crops, split_dehaze
from training.data.vehicles import DataError
from training.dcp import dehaze_dcp
from training.dehaze_engine import run_baselines, train_dehazer
from training.image_metrics import psnr, ssim, ssim_map, to_unit
from training.nets import get_model, list_models
from training.nets.dehazer import dehaze_padded

DEHAZE = SAMPLE / "dehaze"
NAMES = ["001.jpg", "100.jpg", "200.jpg", "300.jpg", "417.jpg", "450.jpg", "480.jpg", "520.jpg"]


@pytest.fixture
def dehaze_copy(tmp_path):
    root = tmp_path / "dehaze"
    shutil.copytree(DEHAZE, root)
    return root


def test_pairs_are_matched_by_name_and_the_tail_is_the_test_set():
    split = split_dehaze(DEHAZE)
    assert [p.name for p in split.train + split.test] == NAMES
    assert [p.name for p in split.test] == ["480.jpg", "520.jpg"]  # round(8 * 0.2)
    assert all(p.hazy.parent.name == "hazy" and p.clear.parent.name == "clear" and p.hazy.name == p.clear.name
               for p in split.train + split.test)
    assert split.summary() == {"train": 6, "test": 2, "excluded": 0}


@pytest.mark.skipif(not (FULL_DATA / "dehaze").is_dir(), reason=f"the full dehaze set is not at {FULL_DATA}")
def test_the_full_set_splits_into_416_train_and_pairs_417_to_520():
    split = split_dehaze(FULL_DATA / "dehaze")
    assert (len(split.train), len(split.test), split.excluded) == (416, 104, [])
    assert (split.train[-1].name, split.test[0].name, split.test[-1].name) == ("416.jpg", "417.jpg", "520.jpg")


@pytest.mark.parametrize("hazy, clear", [("FogPictures", "NoFogPictures"), ("haze", "no_haze")])
def test_other_students_layouts_are_found_below_the_root(tmp_path, hazy, clear):
    nested = tmp_path / "Datasets" / "RemoveFogDatasets"
    shutil.copytree(DEHAZE / "hazy", nested / hazy)
    shutil.copytree(DEHAZE / "clear", nested / clear)
    split = split_dehaze(tmp_path)
    assert len(split.train) + len(split.test) == 8 and split.test[0].hazy.parent.name == hazy


def test_explicit_folders(tmp_path):
    shutil.copytree(DEHAZE / "hazy", tmp_path / "in")
    shutil.copytree(DEHAZE / "clear", tmp_path / "out")
    split = split_dehaze(hazy=tmp_path / "in", clear=tmp_path / "out")
    assert [p.name for p in split.test] == ["480.jpg", "520.jpg"]
    with pytest.raises(DataError, match="both"):
        split_dehaze(hazy=tmp_path / "in")
    with pytest.raises(DataError, match=f"{tmp_path / 'nowhere'} does not exist"):
        split_dehaze(hazy=tmp_path / "in", clear=tmp_path / "nowhere")


def test_unpaired_and_mismatched_files_are_reported_not_used(dehaze_copy, caplog):
    (dehaze_copy / "clear" / "100.jpg").unlink()
    shutil.copy(dehaze_copy / "clear" / "001.jpg", dehaze_copy / "clear" / "999.jpg")
    Image.open(dehaze_copy / "clear" / "200.jpg").resize((60, 40)).save(dehaze_copy / "clear" / "200.jpg")
    split = split_dehaze(dehaze_copy)
    used = {p.name for p in split.train + split.test}
    assert used == set(NAMES) - {"100.jpg", "200.jpg"}
    reasons = {p.relative_to(dehaze_copy).as_posix(): why for p, why in split.excluded}
    assert set(reasons) == {"hazy/100.jpg", "hazy/200.jpg", "clear/999.jpg"}
    assert "no clear image" in reasons["hazy/100.jpg"] and "no hazy image" in reasons["clear/999.jpg"]
    assert "137x103 but clear is 60x40" in reasons["hazy/200.jpg"]
    assert sum("left out" in r.message for r in caplog.records) == 3
    assert [p.name for p in split.test] == ["520.jpg"]  # the tail of the 6 usable pairs: round(6 * 0.2)


def test_bad_paths_say_which_path_and_why(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'missing'} does not exist"):
        split_dehaze(tmp_path / "missing")
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match=f"{tmp_path / 'file.jpg'} is a file"):
        split_dehaze(tmp_path / "file.jpg")
    (tmp_path / "half" / "hazy").mkdir(parents=True)
    with pytest.raises(DataError, match=f"{tmp_path / 'half'} has none of the layouts hazy/clear"):
        split_dehaze(tmp_path / "half")
    (tmp_path / "half" / "clear").mkdir()
    with pytest.raises(DataError, match="hold no images"):
        split_dehaze(tmp_path / "half")


def test_crops_are_aligned_flipped_and_in_unit_range():
    images = load_pairs(split_dehaze(DEHAZE).train)
    identical = [(h, h) for h, _ in images]
    hazy, clear = random_crops(identical, 16, 32, torch.Generator().manual_seed(0))
    assert hazy.shape == (16, 3, 32, 32) and hazy.dtype == torch.float32
    assert torch.equal(hazy, clear) and 0 <= hazy.min() and hazy.max() <= 1
    with pytest.raises(ValueError, match="crop size 200"):
        random_crops(images, 1, 200, torch.Generator())


@pytest.mark.parametrize("size", [(413, 550), (17, 31)])
def test_the_dehazer_takes_any_size_through_the_pad_helper(size):
    model = get_model("dehazer").eval()
    assert model.pad_multiple == 8
    with torch.no_grad():
        for p in [*model.head.parameters(), *model.global_head.parameters()]:
            p.normal_(0, 0.1)
        x = torch.rand(2, 3, *size)
        y = dehaze_padded(model, x)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1 and not torch.equal(x, y)


def test_the_dehazer_starts_as_the_identity_and_checks_its_dilations():
    assert list_models("dehaze") == ["dehazer"]
    x = torch.rand(1, 3, 24, 40)
    with torch.no_grad():
        assert torch.equal(get_model("dehazer")(x), x)
    with pytest.raises(ValueError, match="common factor 2"):
        get_model("dehazer", rates=(2, 4))


@pytest.fixture(scope="module")
def sample_pairs():
    return [load_pair(p) for p in split_dehaze(DEHAZE).test]


def test_psnr_and_ssim_match_scikit_image_on_real_images(sample_pairs):
    for hazy, clear in sample_pairs:
        x, y = to_unit(hazy), to_unit(clear)
        assert psnr(x, y) == pytest.approx(peak_signal_noise_ratio(y, x, data_range=1.0), abs=1e-9)
        expected = structural_similarity(x, y, channel_axis=0, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False)
        assert ssim(x, y) == pytest.approx(expected, abs=1e-9)
        assert ssim(y, y) == pytest.approx(1.0) and psnr(y, y) == float("inf")


def test_the_ssim_loss_is_the_metric_on_tensors(sample_pairs):
    hazy, clear = (torch.from_numpy(to_unit(a)) for a in sample_pairs[0])
    hazy.requires_grad_(True)
    value = ssim_map(hazy, clear).mean()
    value.backward()
    assert value.item() == pytest.approx(ssim(to_unit(sample_pairs[0][0]), to_unit(sample_pairs[0][1])))
    assert hazy.grad.abs().sum() > 0


def test_dark_channel_prior_removes_haze_from_a_sample_pair(sample_pairs):
    hazy, clear = sample_pairs[1]  # 520.jpg
    restored = dehaze_dcp(hazy, **DehazeBaselineConfig().dcp_options())
    assert restored.shape == hazy.shape and 0 <= restored.min() and restored.max() <= 1
    assert psnr(restored, to_unit(clear)) > psnr(to_unit(hazy), to_unit(clear)) + 3


def test_baselines_leave_an_mlflow_run(mlflow_store):
    result = run_baselines(DehazeBaselineConfig(data=str(DEHAZE), experiment="test-dehaze"))
    metrics = result.metrics
    run = mlflow.search_runs(experiment_names=["test-dehaze"], output_format="list")[0]
    assert run.info.run_id == result.run_id and run.data.metrics == pytest.approx(metrics)
    assert metrics["dcp_psnr"] > metrics["identity_psnr"]
    assert run.data.params["omega"] == "0.95" and run.data.params["data.test"] == "2"


def test_a_tiny_training_run_resumed_leaves_one_complete_mlflow_run(tmp_path, mlflow_store):
    first = train_dehazer(tiny_dehaze_config(tmp_path, epochs=1))
    result = train_dehazer(tiny_dehaze_config(tmp_path, resume=str(first.checkpoint)))
    assert result.run_id == first.run_id
    client = mlflow.MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert {"train_loss", "eval_psnr", "eval_ssim", "epoch_seconds", "lr", "test_psnr", "test_ssim",
            "test_identity_psnr", "test_megapixels_per_second", "total_seconds"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(result.run_id, "train_loss")] == [1, 2]
    assert [m.step for m in client.get_metric_history(result.run_id, "eval_psnr")] == [1, 2]
    assert run.data.params["net.width"] == "8" and run.data.params["eval_pairs"] == "1"
    artifacts = {a.path for d in ("plots", "checkpoint", "metrics", "data") for a in client.list_artifacts(result.run_id, d)}
    assert {"plots/comparison.png", "plots/curves.png", "checkpoint/weights.pt", "checkpoint/config.json",
            "metrics/test_per_image.tsv", "data/excluded.tsv"} <= artifacts
    # what export does: rebuild from config.json and load the weights, no pickle
    folder = Path(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="checkpoint"))
    config = json.loads((folder / "config.json").read_text())
    model = get_model(config["net"], **config["net_options"])
    model.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))
    assert config["pad_multiple"] == model.pad_multiple
    assert np.isfinite(result.metrics["test_psnr"])


def test_cli_names_a_bad_data_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    for command in (["train", "dehaze"], ["dehaze-baseline"]):
        assert main([*command, "--data", str(missing)]) == 2
        assert f"dehaze data folder {missing} does not exist" in capsys.readouterr().err
