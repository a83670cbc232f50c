import json
import math

import mlflow
import pytest
from PIL import Image

from conftest import SAMPLE
from training.experiments import HYPERPARAMS_BASE, STUDIES, STUDY_EXPERIMENT, run_study
from training.report import build_report, survivors
from training.stats import paired_difference, t_interval, verdict


def sample_data(name: str) -> str:
    return str(SAMPLE / ("dehaze" if STUDIES[name].task == "dehaze" else "vehicles"))


def other_sources_sample(root):
    """A stand-in for vehicles-other: every fourth sample image per class, renamed web_* and crop_*."""
    import shutil

    for c in ("bus", "car", "truck"):
        (root / c).mkdir(parents=True)
        for i, f in enumerate(sorted((SAMPLE / "vehicles" / c).glob("*.jpg"))[::4]):
            shutil.copy(f, root / c / f"{'web' if i % 2 else 'crop'}_{c}_{i:03d}.jpg")
    return root


def children(parent: str):
    return mlflow.search_runs(experiment_names=[STUDY_EXPERIMENT], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


def rows_of(parent: str) -> list[dict]:
    return json.loads(mlflow.artifacts.load_text(f"runs:/{parent}/study/rows.json"))["rows"]


# --- statistics on known inputs ---------------------------------------------------------------

def test_t_interval_of_known_values():
    # mean 3, sd sqrt(2.5); t(0.975, 4) = 2.776445 -> half-width 2.776445 * 1.581139 / sqrt(5) = 1.963243
    ci = t_interval([1, 2, 3, 4, 5])
    assert (ci.n, ci.mean) == (5, 3.0)
    assert ci.sd == pytest.approx(1.581139, abs=1e-6)
    assert (ci.low, ci.high) == (pytest.approx(1.036757, abs=1e-6), pytest.approx(4.963243, abs=1e-6))
    assert ci.text() == "3.000 ± 1.581 [1.037, 4.963]"
    # t(0.975, 1) = 12.706205: two values give a wide interval
    two = t_interval([0.5, 0.7])
    assert (two.low, two.high) == (pytest.approx(0.6 - 1.270620, abs=1e-6), pytest.approx(0.6 + 1.270620, abs=1e-6))


def test_t_interval_of_one_value_has_no_spread_and_nan_is_dropped():
    one = t_interval([0.4, float("nan")])
    assert one.n == 1 and one.mean == 0.4 and math.isnan(one.low) and not one.excludes_zero()
    assert one.text() == "0.400 (n = 1)"
    with pytest.raises(ValueError, match="no values"):
        t_interval([])


def test_paired_difference_pairs_by_seed_not_by_position():
    a = {3: 0.78, 1: 0.80, 2: 0.82, 9: 0.99}  # seed 9 has no partner: left out
    b = {1: 0.70, 2: 0.75, 3: 0.71}
    d = paired_difference(a, b)  # differences 0.10, 0.07, 0.07
    assert d.n == 3 and d.mean == pytest.approx(0.08)
    # sd 0.0173205, t(0.975, 2) = 4.302653 -> half-width 0.0430265
    assert (d.low, d.high) == (pytest.approx(0.0369735, abs=1e-6), pytest.approx(0.1230265, abs=1e-6))
    assert verdict("A", "B", d, "accuracy") == "A beats B on accuracy: +0.080 (95% CI +0.037 to +0.123, n = 3 pairs)."
    assert verdict("B", "A", paired_difference(b, a), "accuracy").startswith("B trails A on accuracy: -0.080")
    with pytest.raises(ValueError, match="share no seed"):
        paired_difference({1: 0.5}, {2: 0.5})


def test_a_difference_within_the_noise_is_not_a_claim():
    d = paired_difference({1: 0.85, 2: 0.77, 3: 0.81}, {1: 0.80, 2: 0.80, 3: 0.80})  # +0.05, -0.03, +0.01
    assert d.low < 0 < d.high and not d.excludes_zero()
    assert verdict("A", "B", d, "accuracy") == ("No measurable difference between A and B on accuracy at n = 3: "
                                                f"+0.010 (95% CI {d.low:+.3f} to {d.high:+.3f}, n = 3 pairs).")
    same = paired_difference({1: 0.5, 2: 0.6}, {1: 0.5, 2: 0.6})
    assert verdict("A", "B", same, "accuracy") == "A and B give identical accuracy (+0.000 in every one of n = 2 pairs)."


def test_a_lower_loss_beats_and_a_rounding_level_difference_shows_its_size():
    d = paired_difference({1: 0.30, 2: 0.32, 3: 0.31}, {1: 0.35, 2: 0.36, 3: 0.37})  # A's loss lower
    assert verdict("A", "B", d, "loss", higher_is_better=False).startswith("A beats B on loss: -0.050")
    assert verdict("B", "A", paired_difference({1: 0.35, 2: 0.36, 3: 0.37}, {1: 0.30, 2: 0.32, 3: 0.31}), "loss",
                   higher_is_better=False).startswith("B trails A on loss: +0.050")
    tiny = paired_difference({1: 0.5 - 2e-7, 2: 0.6 - 3e-7, 3: 0.7 - 2.5e-7}, {1: 0.5, 2: 0.6, 3: 0.7})
    assert verdict("A", "B", tiny, "loss", higher_is_better=False).startswith("A beats B on loss: -2.5e-07 (95% CI -3")


def test_conclusions_come_from_the_numbers():
    """alexnet is ahead of cnn by the same margin on every seed; mlp's lead flips sign between seeds."""
    cnn = {1: 0.70, 2: 0.74, 3: 0.72}
    rows = []
    for seed, base in cnn.items():
        for split in ("random", "tail"):
            rows += [{"setting": "cnn", "seed": seed, "split": split, "test_accuracy": base},
                     {"setting": "alexnet", "seed": seed, "split": split, "test_accuracy": base + 0.05 + 0.001 * seed},
                     {"setting": "mlp", "seed": seed, "split": split, "test_accuracy": base + (0.06, -0.05, 0.02)[seed - 1]}]
    text = STUDIES["alexnet-mlp"].conclude(rows)
    assert "alexnet beats cnn on in-distribution accuracy: +0.052" in text
    assert "alexnet beats cnn on tail-split accuracy" in text
    assert "No measurable difference between mlp and cnn on in-distribution accuracy at n = 3: +0.010" in text


def test_the_report_summary_separates_claims_from_the_noise():
    conclusion = "\n".join([
        "- summary line: in-distribution accuracy 0.800 ± 0.010 [0.788, 0.812].",
        "- " + verdict("A", "B", paired_difference({1: 0.9, 2: 0.8, 3: 0.85}, {1: 0.7, 2: 0.61, 3: 0.66}), "accuracy"),
        "- " + verdict("A", "C (x)", paired_difference({1: 0.9, 2: 0.8, 3: 0.85}, {1: 0.95, 2: 0.7, 3: 0.88}), "accuracy"),
        "- " + verdict("hand", "cnn (nn.Conv2d)", paired_difference({1: 0.5, 2: 0.6}, {1: 0.5, 2: 0.6}), "loss")])
    claims, within = survivors(conclusion)
    assert claims == ["A beats B on accuracy: +0.193 (95% CI +0.179 to +0.208, n = 3 pairs)."]
    assert within == ["A and C (x) on accuracy", "hand and cnn (nn.Conv2d) give identical loss"]


# --- studies on the in-repo sample ------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_studies(tmp_path_factory) -> dict[str, str]:
    """One real MLflow store holding a quick run of every study (one seed): study -> parent run id."""
    root = tmp_path_factory.mktemp("studies")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(root)  # artifacts land in root/mlruns
        mlflow.set_tracking_uri(uri)
        other = other_sources_sample(root / "other")
        yield {name: run_study(name, sample_data(name), quick=True, validate_on=str(other)) for name in STUDIES}
        mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_quick_study_leaves_a_child_per_setting_seed_and_split(name, quick_studies):
    study, parent = STUDIES[name], quick_studies[name]
    rows = rows_of(parent)
    assert [r["setting"] for r in rows if r["split"] == "tail"] == [label for label, _ in study.settings]
    assert len(rows) == len(study.settings) * len(study.splits)
    # what the study trained itself are its children, each tagged with its setting, seed and split
    # so that `mlflow ui` groups them; the rest are finished runs of the same options, reused
    runs = children(parent)
    trained = [r for r in rows if not r["reused"]]
    assert set(runs["status"]) <= {"FINISHED"} and {r["run_id"] for r in trained} == set(runs["run_id"])
    tags = {(r["tags.lab.setting"], r["tags.lab.seed"], r["tags.lab.split"]) for _, r in runs.iterrows()}
    if study.task == "classify":
        assert tags == {(r["setting"], str(r["seed"]), r["split"]) for r in trained}
        assert all(r["cpu_seconds"] > 0 for r in trained)
    assert mlflow.artifacts.load_text(f"runs:/{parent}/study/conclusion.md").strip()


def test_a_setting_shared_by_studies_trains_once(quick_studies):
    first = {(r["seed"], r["split"]): r["run_id"] for r in rows_of(quick_studies["handwritten-conv"])
             if r["setting"] == "cnn (nn.Conv2d)"}
    for name, label in (("cnn-baseline", "cnn"), ("hyperparams", HYPERPARAMS_BASE), ("alexnet-mlp", "cnn")):
        rows = [r for r in rows_of(quick_studies[name]) if r["setting"] == label]
        assert all(r["reused"] for r in rows) and {(r["seed"], r["split"]): r["run_id"] for r in rows} == first


def test_dehaze_study_pairs_the_methods_per_test_image(quick_studies):
    parent = quick_studies["dehaze"]
    rows = {r["setting"]: r for r in rows_of(parent)}
    assert rows["dark-channel prior"]["test_psnr"] > rows["identity (hazy input)"]["test_psnr"]
    pairs = set(rows["encoder-decoder"]["per_image_psnr"])
    assert pairs and all(set(r["per_image_psnr"]) == pairs for r in rows.values())
    conclusion = mlflow.artifacts.load_text(f"runs:/{parent}/study/conclusion.md")
    assert "encoder-decoder and dark-channel prior on PSNR per test image" in conclusion \
        or "encoder-decoder beats dark-channel prior" in conclusion or "encoder-decoder trails dark" in conclusion
    assert f"of {len(pairs)} images" in conclusion


def test_recipes_study_decides_on_cv_and_other_sources_and_never_scores_the_test_split(quick_studies, tmp_path):
    parent = quick_studies["recipes"]
    rows = rows_of(parent)
    runs = [mlflow.get_run(r["run_id"]) for r in rows]
    assert all("cv_accuracy" in r.data.metrics and "other_accuracy" in r.data.metrics for r in runs)
    assert not any(k.startswith("test_") for r in runs for k in r.data.metrics)
    assert {r.data.params["net"] for r in runs} == {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
                                                    "efficientnet_lite_stack"}
    lines = mlflow.artifacts.load_text(f"runs:/{parent}/study/conclusion.md").splitlines()
    shipped = STUDIES["recipes"].settings[0][0]
    assert len(lines) == 8 + 7 * 2  # a summary per recipe, then two paired verdicts for each against the shipped one
    assert all("blocked CV" in line and "other sources" in line for line in lines[:8])
    for label, _ in STUDIES["recipes"].settings[1:]:
        verdicts = [line for line in lines[8:] if line.removeprefix("- ").startswith(label)
                    or line.startswith(f"- No measurable difference between {label} and")
                    or line.startswith(f"- {label} and {shipped}")]
        assert len(verdicts) == 2 and all("exact McNemar" in v or "same images" in v for v in verdicts)
    before = len(mlflow.search_runs(experiment_names=[STUDY_EXPERIMENT]))
    with pytest.raises(ValueError, match=f"{tmp_path / 'missing'} is not a folder"):
        run_study("recipes", sample_data("recipes"), quick=True, validate_on=str(tmp_path / "missing"))
    assert len(mlflow.search_runs(experiment_names=[STUDY_EXPERIMENT])) == before  # refused before any run


def test_handwritten_study_measures_agreement_and_time(quick_studies):
    m = mlflow.get_run(quick_studies["handwritten-conv"]).data.metrics
    assert m["forward_max_abs_diff"] < 1e-4 and m["weight_grad_max_rel_diff"] < 1e-5
    assert m["loop_vs_torch_max_abs_diff"] < 1e-4
    assert m["seconds_per_batch_loop_12px_1img"] > 0 and m["seconds_per_batch_hand"] > 0


def test_report_from_a_store_with_studies(tmp_path, quick_studies):
    index = build_report(tmp_path / "report")
    text = index.read_text()
    assert "rates 1,2,5 (HDC)" in text and "receptive field 17 px" in text
    assert "in-distribution accuracy" in text and "tail-split night accuracy" in text
    assert all((tmp_path / "report" / f"{name}.png").stat().st_size > 1000 for name in STUDIES if STUDIES[name].curves)
    assert "blocked CV (worst fold)" in text and "the test split is never scored" in text
    # the dehaze section shows hazy | output | clear grids of the dehazer and DCP runs
    assert 'src="dehaze-1.jpg"' in text and 'src="dehaze-2.jpg"' in text and "sd per image" in text
    assert Image.open(tmp_path / "report" / "dehaze-1.jpg").width <= 720
    readme = (tmp_path / "report" / "README.md").read_text()
    assert "| setting |" in readme and "**Conclusions.**" in readme and "## What survived the statistics" in readme
    assert "cores), code at commit" in readme and "summed run time" in readme
    for page in (text, readme):  # nothing of this machine's file system
        assert "/tmp" not in page and str(SAMPLE) not in page and "sqlite" not in page


def test_a_rerun_reuses_finished_runs_and_trains_only_what_did_not_finish(mlflow_store):
    first = run_study("cnn-baseline", sample_data("cnn-baseline"), quick=True, seeds=2)
    trained = rows_of(first)
    assert len(trained) == 4 and not any(r["reused"] for r in trained)  # 2 seeds x 2 splits

    again = rows_of(run_study("cnn-baseline", sample_data("cnn-baseline"), quick=True, seeds=2))
    assert [r["run_id"] for r in again] == [r["run_id"] for r in trained] and all(r["reused"] for r in again)

    interrupted = trained[2]["run_id"]  # as if the study had been stopped during this run
    mlflow.MlflowClient().set_terminated(interrupted, "KILLED")
    resumed = run_study("cnn-baseline", sample_data("cnn-baseline"), quick=True, seeds=2)
    rows = rows_of(resumed)
    assert [r["reused"] for r in rows] == [True, True, False, True]
    assert rows[2]["run_id"] != interrupted and len(children(resumed)) == 1  # only that one trained again
    # other options are another run, never a reuse
    assert not any(r["reused"] for r in rows_of(run_study("cnn-baseline", sample_data("cnn-baseline"), quick=True,
                                                          epochs=2, seeds=1)))


def test_report_without_studies_says_what_to_run(tmp_path, mlflow_store):
    with pytest.raises(ValueError, match="run `roadsight experiment"):
        build_report(tmp_path / "report")
