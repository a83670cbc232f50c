import json

import mlflow
import pytest

from conftest import SAMPLE
from training.experiments import STUDIES, STUDY_EXPERIMENT, run_study
from training.report import build_report


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_quick_study_leaves_a_parent_with_one_child_per_setting(name, mlflow_store):
    parent = run_study(name, str(SAMPLE / "vehicles"), quick=True)
    children = mlflow.search_runs(experiment_names=[STUDY_EXPERIMENT],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == len(STUDIES[name].settings)
    assert set(children["status"]) == {"FINISHED"}
    rows = json.loads(mlflow.artifacts.load_text(f"runs:/{parent}/study/rows.json"))["rows"]
    assert [r["setting"] for r in rows] == [label for label, _ in STUDIES[name].settings]
    assert mlflow.artifacts.load_text(f"runs:/{parent}/study/conclusion.md").strip()


def test_handwritten_study_measures_agreement_and_time(mlflow_store):
    parent = mlflow.get_run(run_study("handwritten-conv", str(SAMPLE / "vehicles"), quick=True))
    m = parent.data.metrics
    assert m["forward_max_abs_diff"] < 1e-4 and m["weight_grad_max_rel_diff"] < 1e-5
    assert m["loop_vs_torch_max_abs_diff"] < 1e-4
    assert m["seconds_per_batch_loop_12px_1img"] > 0 and m["seconds_per_batch_hand"] > 0


def test_report_from_a_store_with_studies(tmp_path, mlflow_store):
    run_study("dilated", str(SAMPLE / "vehicles"), quick=True)
    run_study("resnet-vs-plain", str(SAMPLE / "vehicles"), quick=True)
    index = build_report(tmp_path / "report")
    text = index.read_text()
    assert "rates 1,2,5 (HDC)" in text and "receptive field 17 px" in text
    assert "resnet18" in text and "Not run yet." in text  # studies without runs say so
    assert (tmp_path / "report" / "dilated.png").stat().st_size > 1000
    readme = (tmp_path / "report" / "README.md").read_text()
    assert "| setting |" in readme and "**Conclusion.**" in readme


def test_report_without_studies_says_what_to_run(tmp_path, mlflow_store):
    with pytest.raises(ValueError, match="run `roadsight experiment"):
        build_report(tmp_path / "report")
