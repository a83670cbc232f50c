import json

import mlflow
import pytest
from PIL import Image

from conftest import SAMPLE
from training.experiments import STUDIES, STUDY_EXPERIMENT, run_study
from training.report import build_report


def sample_data(name: str) -> str:
    return str(SAMPLE / ("dehaze" if STUDIES[name].task == "dehaze" else "vehicles"))


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_quick_study_leaves_a_parent_with_one_child_per_setting(name, mlflow_store):
    parent = run_study(name, sample_data(name), quick=True)
    children = mlflow.search_runs(experiment_names=[STUDY_EXPERIMENT],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    # the dehaze study scores identity and DCP in one baselines run beside the dehazer's
    assert len(children) == (2 if name == "dehaze" else len(STUDIES[name].settings))
    assert set(children["status"]) == {"FINISHED"}
    rows = json.loads(mlflow.artifacts.load_text(f"runs:/{parent}/study/rows.json"))["rows"]
    assert [r["setting"] for r in rows] == [label for label, _ in STUDIES[name].settings]
    assert {r["run_id"] for r in rows} == set(children["run_id"])
    assert mlflow.artifacts.load_text(f"runs:/{parent}/study/conclusion.md").strip()


def test_dehaze_study_ranks_the_methods_on_psnr_and_ssim(mlflow_store):
    parent = run_study("dehaze", sample_data("dehaze"), quick=True)
    rows = {r["setting"]: r for r in json.loads(mlflow.artifacts.load_text(f"runs:/{parent}/study/rows.json"))["rows"]}
    assert rows["dark-channel prior"]["test_psnr"] > rows["identity (hazy input)"]["test_psnr"]
    conclusion = mlflow.artifacts.load_text(f"runs:/{parent}/study/conclusion.md")
    assert "encoder-decoder" in conclusion and "SSIM over the dark-channel prior" in conclusion


def test_robustness_conclusion_ranks_the_tail_split_and_sets_the_random_split_apart():
    def row(setting, accuracy, dark):
        return {"setting": setting, "test_accuracy": accuracy, "test_macro_f1": accuracy - 0.05,
                "test_accuracy_dark": dark, "test_accuracy_bright": accuracy, "total_seconds": 10.0}

    labels = [label for label, _ in STUDIES["robustness"].settings]
    shipped, unbalanced, naive, random_split = labels
    text = STUDIES["robustness"].conclude([row(shipped, 0.72, 0.74), row(unbalanced, 0.67, 0.66),
                                           row(naive, 0.60, 0.40), row(random_split, 0.95, 0.98)])
    assert f"Most robust at night: **{shipped}** (test_accuracy_dark 0.740" in text  # not the random split's 0.98
    assert f"worst: **{naive}**" in text
    assert "scores 0.950 accuracy / 0.900 macro-F1 (night 0.980) against 0.720 / 0.670 on the tail split" in text


def test_handwritten_study_measures_agreement_and_time(mlflow_store):
    parent = mlflow.get_run(run_study("handwritten-conv", str(SAMPLE / "vehicles"), quick=True))
    m = parent.data.metrics
    assert m["forward_max_abs_diff"] < 1e-4 and m["weight_grad_max_rel_diff"] < 1e-5
    assert m["loop_vs_torch_max_abs_diff"] < 1e-4
    assert m["seconds_per_batch_loop_12px_1img"] > 0 and m["seconds_per_batch_hand"] > 0


def test_report_from_a_store_with_studies(tmp_path, mlflow_store):
    run_study("dilated", str(SAMPLE / "vehicles"), quick=True)
    run_study("resnet-vs-plain", str(SAMPLE / "vehicles"), quick=True)
    run_study("dehaze", sample_data("dehaze"), quick=True)
    index = build_report(tmp_path / "report")
    text = index.read_text()
    assert "rates 1,2,5 (HDC)" in text and "receptive field 17 px" in text
    assert "resnet18" in text and "Not run yet." in text  # studies without runs say so
    assert (tmp_path / "report" / "dilated.png").stat().st_size > 1000
    # the dehaze section shows hazy | output | clear grids of the dehazer and DCP runs
    assert 'src="dehaze-1.jpg"' in text and 'src="dehaze-2.jpg"' in text and "test_psnr" in text
    assert Image.open(tmp_path / "report" / "dehaze-1.jpg").width <= 720
    readme = (tmp_path / "report" / "README.md").read_text()
    assert "| setting |" in readme and "**Conclusion.**" in readme


def test_report_without_studies_says_what_to_run(tmp_path, mlflow_store):
    with pytest.raises(ValueError, match="run `roadsight experiment"):
        build_report(tmp_path / "report")
