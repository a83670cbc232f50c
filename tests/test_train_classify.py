import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch

from conftest import SAMPLE, tiny_config
from training import interrupts, tracking
from training.engine import train_classifier

EXPECTED_EPOCH_METRICS = {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "test_macro_f1",
                          "epoch_seconds", "lr", "val_accuracy", "val_night_accuracy"}


def test_one_epoch_leaves_a_complete_mlflow_run(tmp_path, mlflow_store):
    result = train_classifier(tiny_config(tmp_path))
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert EXPECTED_EPOCH_METRICS <= set(run.data.metrics)
    assert {"test_accuracy_dark", "test_f1_car", "total_seconds"} <= set(run.data.metrics)
    assert run.data.params["net"] == "cnn" and run.data.params["net.depth"] == "2"
    assert run.data.params["data.test"] == "6"  # 20% of 12 per class
    artifacts = {a.path for d in ("plots", "checkpoint", "metrics", "data")
                 for a in mlflow.MlflowClient().list_artifacts(result.run_id, d)}
    assert {"plots/confusion_matrix.png", "plots/curves.png", "plots/misclassified.png", "checkpoint/weights.pt",
            "checkpoint/config.json", "metrics/test_report.json", "data/excluded.tsv"} <= artifacts
    config = json.loads(mlflow.artifacts.load_text(f"runs:/{result.run_id}/checkpoint/config.json"))
    assert config["classes"] == ["bus", "car", "truck"]


def test_resume_continues_the_same_run(tmp_path, mlflow_store):
    first = train_classifier(tiny_config(tmp_path, epochs=1))
    state = torch.load(first.checkpoint, weights_only=True)
    assert state["epoch"] == 1
    # extend the schedule by one epoch and continue from the checkpoint
    resumed = train_classifier(tiny_config(tmp_path, epochs=2, resume=str(first.checkpoint), schedule="constant"))
    assert resumed.run_id == first.run_id
    history = mlflow.MlflowClient().get_metric_history(first.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2]


def test_cli_names_a_bad_data_path(tmp_path):
    missing = tmp_path / "nowhere"
    proc = subprocess.run([sys.executable, "-m", "training.cli", "train", "classify", "--data", str(missing)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert f"vehicle data folder {missing} does not exist" in proc.stderr


def test_head_only_epochs_train_the_final_layer_alone(tmp_path, mlflow_store):
    import torch.nn as nn

    from training.nets import build_classifier

    result = train_classifier(tiny_config(tmp_path, head_only_epochs=1, val_fraction=0.0))
    torch.manual_seed(0)  # train_classifier seeds with cfg.seed=0 before building: rebuild the same init
    initial = build_classifier("cnn", 3, (32, 32), depth=2, width=8)
    trained = result.model.state_dict()
    for name, before in initial.state_dict().items():
        changed = not torch.equal(before, trained[name])
        assert changed == name.startswith("backbone.fc."), name  # BN statistics included
    assert isinstance(result.model.backbone.fc, nn.Linear)


def test_linear_probe_alone_fits_the_head_by_lbfgs(tmp_path, mlflow_store):
    result = train_classifier(tiny_config(tmp_path, epochs=0, linear_probe_l2=1e-3, val_fraction=0.0))
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["probe_seconds"] > 0
    torch.manual_seed(0)
    from training.nets import build_classifier

    initial = build_classifier("cnn", 3, (32, 32), depth=2, width=8)
    trained = result.model.state_dict()
    changed = {n for n, before in initial.state_dict().items() if not torch.equal(before, trained[n])}
    assert changed == {"backbone.fc.weight", "backbone.fc.bias"}


def test_lighting_balance_drops_the_extra_night_shots_and_logs_them(tmp_path, mlflow_store):
    # the sample's training part: 2 of 10 buses, 1 of 10 cars, 2 of 10 trucks are night shots
    result = train_classifier(tiny_config(tmp_path, epochs=0, linear_probe_l2=1e-3, val_fraction=0.0,
                                          balance_lighting=True))
    run = mlflow.get_run(result.run_id)
    assert run.data.params["data.lighting_dropped"] == "2"
    dropped = mlflow.artifacts.load_text(f"runs:/{result.run_id}/data/lighting_dropped.txt").splitlines()
    assert sorted(os.path.basename(os.path.dirname(path)) for path in dropped) == ["bus", "truck"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_an_interrupted_run_is_killed_and_resumes_from_its_checkpoint(tmp_path, mlflow_store, signum):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    cmd = [sys.executable, "-m", "training.cli", "train", "classify", "--data", str(SAMPLE / "vehicles"), "--net", "cnn",
           "--net-options", '{"depth": 2, "width": 8}', "--image-size", "32", "--epochs", "500", "--batch-size", "8",
           "--val-fraction", "0.2", "--no-log-model", "--checkpoint-dir", str(tmp_path / "ckpt"),
           "--experiment", "test-kill"]
    # as from a terminal: a shell's background job (CI's, perhaps) ignores SIGINT, and Python then never
    # turns Ctrl-C into KeyboardInterrupt
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not list((tmp_path / "ckpt").glob("*/last.pt")) and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr
    (run,) = mlflow.search_runs(experiment_names=["test-kill"], output_format="list")
    assert run.info.status == "KILLED"
    checkpoint = next((tmp_path / "ckpt").glob("*/last.pt"))
    epoch = torch.load(checkpoint, weights_only=True)["epoch"]
    assert epoch >= 1
    # the same options as the command above (tiny_config), continued for one more epoch
    resumed = train_classifier(tiny_config(tmp_path, epochs=epoch + 1, resume=str(checkpoint), experiment="test-kill"))
    assert resumed.run_id == run.info.run_id and mlflow.get_run(run.info.run_id).info.status == "FINISHED"
    assert torch.load(checkpoint, weights_only=True)["epoch"] == epoch + 1


@pytest.fixture
def installed_interrupts(monkeypatch):
    """The command line's signal handlers for the duration of one test."""
    monkeypatch.setattr(interrupts, "_pending", [])
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    interrupts.install()
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def test_a_signal_swallowed_by_a_finalizer_still_stops_the_next_training_step(tmp_path, mlflow_store, monkeypatch,
                                                                              installed_interrupts):
    # Python runs a signal's handler wherever the main thread is; inside a finalizer the raised
    # KeyboardInterrupt is only reported as unraisable (CI saw this in a SQLAlchemy GC callback)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: unraisable.append(info.exc_type))

    class Finalized:
        def __del__(self):
            signal.raise_signal(signal.SIGTERM)

    Finalized()
    assert unraisable == [KeyboardInterrupt]
    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        train_classifier(tiny_config(tmp_path, epochs=3))
    (run,) = mlflow.search_runs(experiment_names=["test-classify"], output_format="list")
    assert run.info.status == "KILLED"


def test_inside_a_run_the_first_signal_waits_for_the_next_step_and_a_second_stops_at_once(installed_interrupts):
    # CI saw Ctrl-C land inside an MLflow commit, leaving SQLite locked so the run could not be marked KILLED
    with pytest.raises(KeyboardInterrupt, match="signal 2"):
        with interrupts.deferred():
            signal.raise_signal(signal.SIGINT)  # a database write here would run to its end
            with pytest.raises(KeyboardInterrupt, match="signal 2"):
                interrupts.raise_if_pending()
            signal.raise_signal(signal.SIGINT)  # held again: the first one was handled
            assert interrupts._pending == [signal.SIGINT]
            with pytest.raises(KeyboardInterrupt, match="signal 15"):
                signal.raise_signal(signal.SIGTERM)  # the user insists
            interrupts.clear()
            signal.raise_signal(signal.SIGINT)
        # the block's end raises what is still pending
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)  # outside a run: at once, as Python does


@pytest.fixture
def other_sources(tmp_path):
    """A stand-in for vehicles-other: sample images renamed web_* and crop_* (crops of cars and trucks only)."""
    import shutil

    from conftest import SAMPLE

    root = tmp_path / "other"
    for c in ("bus", "car", "truck"):
        (root / c).mkdir(parents=True)
        files = sorted((SAMPLE / "vehicles" / c).glob("*.jpg"))[::4]
        for i, f in enumerate(files):
            prefix = "web" if c == "bus" or i % 2 else "crop"
            shutil.copy(f, root / c / f"{prefix}_{c}_{i:03d}.jpg")
    return root


def test_blocked_cv_from_the_command_line_logs_a_parent_run_with_a_child_per_fold(tmp_path, mlflow_store, other_sources):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    cmd = [sys.executable, "-m", "training.cli", "train", "classify", "--data", str(SAMPLE / "vehicles"), "--net", "cnn",
           "--net-options", '{"depth": 2, "width": 8}', "--image-size", "32", "--epochs", "0", "--linear-probe-l2", "0.01",
           "--cv", "blocked:3", "--validate-on", str(other_sources), "--no-score-test", "--no-log-model",
           "--feature-cache", str(tmp_path / "features"), "--checkpoint-dir", str(tmp_path / "ckpt"), "--experiment", "test-cv"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "blocked-CV accuracy" in proc.stdout and "other-source accuracy" in proc.stdout and "temperature" in proc.stdout
    runs = mlflow.search_runs(experiment_names=["test-cv"], output_format="list")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["cv_fold"] for r in children) == ["1", "2", "3"]
    assert all(r.info.status == "FINISHED" for r in runs)
    held = [mlflow.artifacts.load_text(f"runs:/{r.info.run_id}/data/held_out.txt").splitlines() for r in children]
    assert sum(map(len, held)) == 30 and len({p for h in held for p in h}) == 30  # the training part, once each
    for child in children:
        assert {"cv_accuracy", "cv_macro_f1", "cv_ece", "other_accuracy", "other_web_accuracy",
                "other_crop_accuracy", "other_recall_bus"} <= set(child.data.metrics)
    m = parent.data.metrics
    fold_accuracy = [r.data.metrics["cv_accuracy"] for r in children]
    assert m["cv_accuracy"] == pytest.approx(sum(fold_accuracy) / 3)
    assert m["cv_accuracy_std"] == pytest.approx(float(torch.tensor(fold_accuracy).std(unbiased=False)))
    assert {"cv_other_accuracy", "other_accuracy", "other_web_accuracy", "other_crop_accuracy", "other_web_recall_bus",
            "other_crop_recall_car", "temperature", "cv_ece_uncalibrated", "cv_ece_calibrated",
            "other_ece_uncalibrated", "other_ece_calibrated"} <= set(m)
    assert not any(k.startswith("test_") for k in m)  # --no-score-test: the test split stays unseen
    assert m["cv_ece_calibrated"] <= m["cv_ece_uncalibrated"] + 0.05
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "plots")}
    assert "plots/reliability.png" in artifacts
    weights = torch.load(mlflow.artifacts.download_artifacts(f"runs:/{parent.info.run_id}/checkpoint/weights.pt"),
                         weights_only=True)
    assert float(weights["temperature"]) == pytest.approx(m["temperature"])  # carried into the export


def test_cross_validation_of_a_trained_recipe_trains_every_fold(tmp_path, mlflow_store):
    result = train_classifier(tiny_config(tmp_path, epochs=1, val_fraction=0.0, cv="blocked:2", calibrate=False))
    runs = mlflow.search_runs(experiment_names=["test-classify"], output_format="list")
    assert len(runs) == 3
    assert {"cv_accuracy", "cv_accuracy_std", "test_accuracy"} <= set(mlflow.get_run(result.run_id).data.metrics)
    assert float(result.model.temperature) == 1.0


def test_extra_data_joins_the_fitted_part_and_every_fold_and_is_logged(tmp_path, mlflow_store, other_sources):
    result = train_classifier(tiny_config(tmp_path, epochs=0, linear_probe_l2=1e-2, val_fraction=0.0, cv="blocked:2",
                                          extra_data=str(other_sources), feature_cache=str(tmp_path / "features")))
    run = mlflow.get_run(result.run_id)
    assert run.data.params["data.extra"] == "9" and run.data.params["extra_share"] == "0.5"
    folds = [r for r in mlflow.search_runs(experiment_names=["test-classify"], output_format="list")
             if r.data.tags.get("mlflow.parentRunId") == result.run_id]
    assert sorted(int(r.data.params["fitted_images"]) + int(r.data.params["held_out"]) for r in folds) == [30 + 9] * 2
    extra = mlflow.artifacts.load_text(f"runs:/{result.run_id}/data/extra.txt").splitlines()
    assert len(extra) == 9 and all("other" in path for path in extra)


def test_extra_images_carry_their_share_of_the_fit():
    from training.engine import Images

    def part(n, label):
        return Images([SAMPLE] * n, torch.zeros(n, 3, 4, 4, dtype=torch.uint8), torch.full((n,), label))

    course, extra = part(30, 1), part(6, 0)
    fitted = course.with_extra(extra, 0.5)
    assert fitted.weight[:30].tolist() == [1.0] * 30 and torch.allclose(fitted.weight[30:], torch.full((6,), 5.0))
    assert float(course.with_extra(extra, 0.25).weight[30:].sum()) == pytest.approx(10.0)  # a quarter of the total
    assert course.with_extra(part(0, 0), 0.5) is course
    assert fitted.subset([0, 31]).weight.tolist() == [1.0, 5.0]
    with pytest.raises(ValueError, match="--extra-share must be between 0 and 1"):
        course.with_extra(extra, 1.0)


def test_a_weighted_probe_is_the_probe_on_images_repeated_that_often():
    from training.engine import fit_linear_probe

    generator = torch.Generator().manual_seed(0)
    features, labels = torch.randn(2, 12, 5, generator=generator), torch.arange(12) % 3
    weights = torch.tensor([3.0, 2.0] + [1.0] * 10)
    repeated = [0, 0, 0, 1, 1] + list(range(2, 12))
    weighted, plain = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    fit_linear_probe(weighted, features, labels, 0.1, torch.device("cpu"), weights)
    fit_linear_probe(plain, features[:, repeated], labels[repeated], 0.1, torch.device("cpu"))
    torch.testing.assert_close(weighted.weight, plain.weight, atol=5e-3, rtol=0)  # L-BFGS stops near the optimum
    fit_linear_probe(plain, features, labels, 0.1, torch.device("cpu"))  # unweighted: another fit
    assert (weighted.weight - plain.weight).abs().max() > 1e-2


def test_a_signal_while_a_failed_run_is_ended_leaves_it_failed(mlflow_store, monkeypatch, installed_interrupts):
    # under torchrun, a process whose peer failed gets the peer's error and torchrun's SIGTERM together
    end_run = mlflow.end_run

    def end_run_under_sigterm(status):
        signal.raise_signal(signal.SIGTERM)  # lands in the middle of the run's final writes
        end_run(status)

    monkeypatch.setattr(mlflow, "end_run", end_run_under_sigterm)
    with pytest.raises(RuntimeError, match="peer failed"):
        with tracking.tracked_run("test-signal-at-end"):
            raise RuntimeError("peer failed")
    (run,) = mlflow.search_runs(experiment_names=["test-signal-at-end"], output_format="list")
    assert run.info.status == "FAILED"


def test_compare_pairs_two_runs_image_by_image_out_of_fold_and_on_other_sources(tmp_path, mlflow_store, other_sources,
                                                                                 capsys):
    from training import cli
    from training.tracking import load_predictions

    probe = dict(epochs=0, val_fraction=0.0, cv="blocked:2", validate_on=str(other_sources), score_test=False)
    weak = train_classifier(tiny_config(tmp_path, linear_probe_l2=100.0, **probe)).run_id
    strong = train_classifier(tiny_config(tmp_path, linear_probe_l2=0.01, **probe)).run_id
    out_of_fold = load_predictions(strong, "cv_out_of_fold")
    assert len(out_of_fold) == 30 and all(image.split("/")[0] == label for image, (label, _) in out_of_fold.items())
    assert len(load_predictions(strong, "other")) == 9

    assert cli.main(["compare", weak, strong, "--json"]) == 0
    rows = {row["set"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"cv_out_of_fold", "other"}
    cv = rows["cv_out_of_fold"]
    assert cv["images"] == 30 and cv["only_in_a"] == cv["only_in_b"] == 0
    strong_right = sum(label == predicted for label, predicted in out_of_fold.values())
    assert cv["accuracy_b"] == pytest.approx(strong_right / 30)
    assert cv["accuracy_b"] - cv["accuracy_a"] == pytest.approx((cv["right_only_by_b"] - cv["right_only_by_a"]) / 30)
    assert 0 < cv["mcnemar_p"] <= 1 and cv["verdict"].endswith(".")

    assert cli.main(["compare", strong, strong]) == 0
    assert capsys.readouterr().out.count("are right on the same images") == 2

    plain = train_classifier(tiny_config(tmp_path, epochs=0, linear_probe_l2=0.01, val_fraction=0.0)).run_id
    assert cli.main(["compare", plain, strong]) == 2
    error = capsys.readouterr().err
    assert f"run {plain} has no predictions/cv_out_of_fold.csv" in error and "predictions/other.csv" in error


def test_predictions_keep_a_file_name_with_a_comma_or_quote(mlflow_store):
    from training.tracking import load_predictions, log_predictions

    with tracking.tracked_run("test-predictions") as run:
        log_predictions("other", ["/photos/bus/my bus, \"front\".jpg", "/x/car/b.jpg"], [0, 1], [2, 1], ("bus", "car", "truck"))
    assert load_predictions(run.info.run_id, "other") == {'bus/my bus, "front".jpg': ("bus", "truck"),
                                                          "car/b.jpg": ("car", "car")}


def test_mcnemar_counts_only_the_images_one_model_gets_right():
    from training.stats import images_verdict, paired_images

    both, neither = [True] * 100, [False] * 10
    paired = paired_images([True] * 23 + [False] * 9 + both + neither, [False] * 23 + [True] * 9 + both + neither)
    assert (paired.n, paired.only_a, paired.only_b) == (142, 23, 9)
    assert paired.p == pytest.approx(0.0201, abs=1e-4)  # 2 x P(Binomial(32, 1/2) <= 9)
    assert images_verdict("A", "B", paired, "x").startswith("A beats B on x: +0.099")
    assert images_verdict("B", "A", paired_images([True] * 9 + [False] * 23, [False] * 9 + [True] * 23), "x").startswith("B trails A")
    close = paired_images([True] * 6 + [False] * 4, [False] * 6 + [True] * 4)
    assert close.p == pytest.approx(0.754, abs=1e-3) and images_verdict("A", "B", close, "x").startswith("No measurable")
    with pytest.raises(ValueError, match="same images"):
        paired_images([True], [True, False])
