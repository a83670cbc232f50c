import json

import mlflow
import numpy as np
import onnxruntime as ort
import pytest

from conftest import REPO, SAMPLE, tiny_config
from training.evaluate import evaluate_onnx
from training.export import ExportError, export_classifier, sha256_of
from training.engine import train_classifier
from training.tracking import resolve_run_id


@pytest.fixture
def exported_classifier(tmp_path, mlflow_store):
    run = train_classifier(tiny_config(tmp_path, val_fraction=0.0))
    json_path = export_classifier(run.run_id, tmp_path / "models", data=str(SAMPLE / "vehicles"))
    return run, json_path


def test_classifier_export_round_trip(exported_classifier):
    run, json_path = exported_classifier
    contract = json.loads(json_path.read_text())
    onnx_path = json_path.with_suffix(".onnx")
    assert contract["schema"] == "roadsight.model/1" and contract["task"] == "classify"
    assert contract["labels"] == ["bus", "car", "truck"]
    assert contract["input"] == {"name": "images", "dtype": "uint8", "layout": "NCHW", "color": "RGB", "height": 32,
                                 "width": 32, "resize": "stretch", "filter": "bilinear"}
    assert contract["sha256"] == sha256_of(onnx_path)
    assert contract["parity"]["max_abs_probability_difference"] <= 1e-4
    assert contract["source"]["mlflow_run_id"] == run.run_id
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        x = np.random.default_rng(batch).integers(0, 256, (batch, 3, 32, 32), dtype=np.uint8)
        (probabilities,) = session.run(None, {"images": x})
        assert probabilities.shape == (batch, 3) and probabilities.dtype == np.float32
        np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    # the ONNX file, read through its contract alone, scores what training scored
    assert contract["metrics"]["accuracy"] == pytest.approx(run.metrics["test_accuracy"])
    assert evaluate_onnx(json_path, str(SAMPLE / "vehicles"))["macro_f1"] == pytest.approx(run.metrics["test_macro_f1"])


def test_export_registers_the_onnx_model_with_the_champion_alias(exported_classifier):
    run, json_path = exported_classifier
    uri = json.loads(json_path.read_text())["source"]["model_uri"]
    assert uri == "models:/vehicle-classifier/1"
    assert resolve_run_id("models:/vehicle-classifier@champion") == run.run_id
    model = mlflow.onnx.load_model(uri)
    assert [i.name for i in model.graph.input] == ["images"]


def test_export_of_an_unknown_run_names_it(tmp_path, mlflow_store):
    with pytest.raises(ExportError, match="run 0123abcd: cannot fetch its checkpoint"):
        export_classifier("0123abcd", tmp_path)


def test_an_export_with_no_score_test_never_reads_the_test_split(tmp_path, mlflow_store):
    """Its parity check runs on training images and its JSON has no test metrics: here every test-split
    file is unreadable, and the export still succeeds."""
    import shutil

    from training.data.vehicles import split_vehicles

    run = train_classifier(tiny_config(tmp_path, val_fraction=0.0))
    data = tmp_path / "vehicles"
    shutil.copytree(SAMPLE / "vehicles", data)
    for sample in split_vehicles(data).test:
        sample.path.write_bytes(b"not an image: " + sample.path.name.encode())  # distinct bytes, no duplicates
    contract = json.loads(export_classifier(run.run_id, tmp_path / "models", data=str(data), register=False,
                                            score_test=False).read_text())
    assert contract["metrics"] == {}
    assert contract["parity"]["split"] == "train" and contract["parity"]["images"] == len(split_vehicles(data).train)
    assert contract["parity"]["max_abs_probability_difference"] <= 1e-4
    with pytest.raises(Exception, match="cannot decode"):
        export_classifier(run.run_id, tmp_path / "scored", data=str(data), register=False)


def test_no_score_test_is_refused_for_a_dehazer_export(capsys):
    from training.cli import main

    assert main(["export", "dehaze", "--run", "0123abcd", "--no-score-test"]) == 2
    assert "--no-score-test is for classifier exports" in capsys.readouterr().err


SHIPPED = sorted((REPO / "models").glob("*.json"))


@pytest.mark.parametrize("json_path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_metadata_matches_its_onnx_file(json_path):
    contract = json.loads(json_path.read_text())
    assert contract["sha256"] == sha256_of(json_path.parent / contract["file"])
    assert (json_path.parent / contract["file"]).stat().st_size <= 20 * 2**20


def test_export_records_what_the_recipe_was_chosen_on(tmp_path, mlflow_store):
    other = str(SAMPLE / "vehicles")  # stands in for a folder of other-source images
    run = train_classifier(tiny_config(tmp_path, epochs=0, linear_probe_l2=1e-2, val_fraction=0.0, cv="blocked:2",
                                       validate_on=other))
    json_path = export_classifier(run.run_id, tmp_path / "models", data=str(SAMPLE / "vehicles"), register=False)
    contract = json.loads(json_path.read_text())
    selection = contract["selection"]
    assert selection["run_metrics"]["cv_accuracy"] == pytest.approx(run.metrics["cv_accuracy"])
    assert selection["run_metrics"]["temperature"] == pytest.approx(run.metrics["temperature"])
    # the ONNX file, temperature included, scores the other-source images as the run did
    assert selection["other_source"]["images"] == 36
    assert selection["other_source"]["accuracy"] == pytest.approx(run.metrics["other_accuracy"])
    assert selection["other_source"]["ece"] == pytest.approx(run.metrics["other_ece"], abs=1e-4)
    assert {"ece", "images_per_second_batch1", "images_per_second_batch32"} <= set(contract["metrics"])
