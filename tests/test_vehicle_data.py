import shutil

import numpy as np
import pytest

from conftest import SAMPLE, FULL_DATA, needs_full_data
from training.data.vehicles import (DataError, blocked_folds, carve_validation, labelled_folder, lighting_balanced,
                                    list_images, parse_cv, source_group, split_vehicles)
from training.features import file_digest


def test_tail_split_takes_the_last_names_of_each_class():
    split = split_vehicles(SAMPLE / "vehicles", test_fraction=0.25)
    for label, name in enumerate(split.classes):
        files = list_images(SAMPLE / "vehicles" / name)
        test = [s.path for s in split.test if s.label == label]
        assert test == files[-3:]  # 25% of 12
    assert split.summary()["train"] + split.summary()["test"] == 36


def test_random_split_is_seeded_and_keeps_per_class_counts():
    a = split_vehicles(SAMPLE / "vehicles", split="random", seed=1)
    b = split_vehicles(SAMPLE / "vehicles", split="random", seed=1)
    c = split_vehicles(SAMPLE / "vehicles", split="random", seed=2)
    tail = split_vehicles(SAMPLE / "vehicles")
    assert a.test == b.test and a.test != c.test
    assert a.summary() == tail.summary()
    assert {s.path for s in a.train}.isdisjoint({s.path for s in a.test})


def test_test_fraction_outside_the_labs_range_is_refused():
    with pytest.raises(ValueError, match="0.2-0.3"):
        split_vehicles(SAMPLE / "vehicles", test_fraction=0.5)


@pytest.fixture
def vehicle_copy(tmp_path):
    root = tmp_path / "vehicles"
    shutil.copytree(SAMPLE / "vehicles", root)
    return root


def test_duplicate_policy(vehicle_copy):
    bus = list_images(vehicle_copy / "bus")
    car = list_images(vehicle_copy / "car")
    # bus[0]'s bytes also filed as a car (conflict), and car[0] repeated within its class at the tail
    shutil.copy(bus[0], vehicle_copy / "car" / "car999.jpg")
    shutil.copy(car[0], vehicle_copy / "car" / "car998.jpg")
    split = split_vehicles(vehicle_copy)
    kept = {s.path.name for s in split.train + split.test}
    assert bus[0].name not in kept and "car999.jpg" not in kept  # conflicting labels: both sides dropped
    assert car[0].name in kept and "car998.jpg" not in kept  # same label: first kept once
    reasons = dict((p.name, why) for p, why in split.excluded)
    assert "conflicting labels" in reasons["car999.jpg"] and "kept once" in reasons["car998.jpg"]
    assert len(split.excluded) == 3


def test_non_images_are_skipped_and_the_course_nesting_is_found(tmp_path):
    nested = tmp_path / "实验3数据包" / "车辆分类数据集"
    shutil.copytree(SAMPLE / "vehicles", nested)
    (nested / "bus" / "desktop.ini").write_text("[.ShellClassInfo]")
    split = split_vehicles(tmp_path / "实验3数据包")
    assert len(split.train) + len(split.test) == 36
    assert not any(s.path.suffix == ".ini" for s in split.train + split.test)


def test_bad_paths_say_which_path_and_why(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'missing'} does not exist"):
        split_vehicles(tmp_path / "missing")
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="is a file"):
        split_vehicles(tmp_path / "file.jpg")
    (tmp_path / "empty" / "bus").mkdir(parents=True)
    with pytest.raises(DataError, match="no bus/car/truck sub-folders"):
        split_vehicles(tmp_path / "empty")
    for c in ("car", "truck"):
        (tmp_path / "empty" / c).mkdir()
    with pytest.raises(DataError, match=r"empty/bus holds no images"):
        split_vehicles(tmp_path / "empty")


def test_validation_is_the_tail_of_the_training_part():
    split = split_vehicles(SAMPLE / "vehicles")
    fit, val = carve_validation(split.train, 0.2, 3)
    assert len(fit) + len(val) == len(split.train) and len(val) == 6
    for label in range(3):
        names = [s.path.name for s in split.train if s.label == label]
        assert [s.path.name for s in val if s.label == label] == names[-2:]


def _images(lumas: list[int]) -> np.ndarray:
    return np.stack([np.full((3, 4, 4), luma, np.uint8) for luma in lumas])


def test_lighting_balance_gives_every_class_the_smallest_night_share():
    # class 0: 4 bright + 2 dark; class 1: 6 bright + 1 dark (share 1/7, the smallest); class 2: 10 bright + 4 dark
    lumas = [200, 30, 200, 200, 20, 200] + [150] * 6 + [10] + [120] * 10 + [5] * 4
    labels = np.array([0] * 6 + [1] * 7 + [2] * 14)
    keep = lighting_balanced(_images(lumas), labels, 3)
    dark = np.array(lumas)[keep] < 80
    kept_labels = labels[keep]
    # night shots kept: 1/7 of the class after balancing, i.e. bright / 6: round(4/6) = 1, 1, round(10/6) = 2
    assert [int(dark[kept_labels == c].sum()) for c in range(3)] == [1, 1, 2]
    assert [int((~dark & (kept_labels == c)).sum()) for c in range(3)] == [4, 6, 10]  # every bright image stays
    assert list(keep[:2]) == [0, 1]  # the first night shot by position is the one kept


def test_lighting_balance_drops_every_night_shot_when_one_class_has_none():
    labels = np.array([0, 0, 1, 1, 2])
    keep = lighting_balanced(_images([20, 200, 200, 210, 40]), labels, 3)
    assert keep.tolist() == [1, 2, 3]


@needs_full_data
def test_full_vehicle_split_matches_the_documented_counts():
    split = split_vehicles(FULL_DATA / "vehicles")
    assert split.summary() == {"train": 1074, "test": 270, "excluded": 13, "train_bus": 169, "train_car": 620,
                               "train_truck": 285, "test_bus": 44, "test_car": 154, "test_truck": 72}
    assert sum("conflicting" in why for _, why in split.excluded) == 10


@pytest.mark.parametrize("k", [2, 3, 5])
def test_blocked_folds_hold_out_contiguous_blocks_of_every_class_and_cover_the_training_part(k):
    split = split_vehicles(SAMPLE / "vehicles", test_fraction=0.25)  # 9 training images per class
    folds = blocked_folds(split.train, k, 3)
    assert len(folds) == k
    held = [i for fold in folds for i in fold]
    assert sorted(held) == list(range(len(split.train)))  # disjoint and covering
    for label in range(3):
        names = [s.path.name for s in split.train if s.label == label]
        blocks = [[split.train[i].path.name for i in fold if split.train[i].label == label] for fold in folds]
        assert [name for block in blocks for name in block] == names  # fold i holds block i, in name order
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
        assert all(blocks)  # every fold holds out some images of every class


def test_blocked_folds_sort_by_name_whatever_the_order_given():
    split = split_vehicles(SAMPLE / "vehicles")
    shuffled = list(reversed(split.train))
    first = [shuffled[i].path.name for i in blocked_folds(shuffled, 4, 3)[0]]
    assert sorted(first) == sorted(s.path.name for s in (split.train[i] for i in blocked_folds(split.train, 4, 3)[0]))
    assert "bus001.jpg" in first and "car001.jpg" in first


def test_no_image_is_on_both_sides_of_a_fold(vehicle_copy):
    bus = list_images(vehicle_copy / "bus")
    car = list_images(vehicle_copy / "car")
    shutil.copy(bus[0], vehicle_copy / "car" / "car500.jpg")  # conflicting labels, mid-list
    shutil.copy(car[0], vehicle_copy / "car" / "car501.jpg")  # a repeat within the class, in another block
    split = split_vehicles(vehicle_copy)
    for fold in blocked_folds(split.train, 3, 3):
        inside = {file_digest(split.train[i].path) for i in fold}
        outside = {file_digest(s.path) for i, s in enumerate(split.train) if i not in fold}
        assert inside.isdisjoint(outside)
    names = {s.path.name for s in split.train}
    assert "car501.jpg" not in names and "car500.jpg" not in names and bus[0].name not in names


def test_cv_specs_are_parsed_or_refused():
    assert parse_cv("blocked:5") == 5 and parse_cv(None) == 0 and parse_cv("none") == 0
    for bad in ("random:5", "blocked", "blocked:x", "5"):
        with pytest.raises(ValueError, match="blocked:K"):
            parse_cv(bad)
    split = split_vehicles(SAMPLE / "vehicles")
    with pytest.raises(ValueError, match="fewer than the 20 folds"):
        blocked_folds(split.train, 20, 3)
    with pytest.raises(ValueError, match="at least 2 folds"):
        blocked_folds(split.train, 1, 3)


def test_other_source_folders_are_read_whole_with_their_source_groups(tmp_path):
    for c in ("bus", "car", "truck"):
        (tmp_path / c).mkdir()
    shutil.copy(SAMPLE / "vehicles" / "bus" / "bus001.jpg", tmp_path / "bus" / "web_bus_001.jpg")
    shutil.copy(SAMPLE / "vehicles" / "car" / "car001.jpg", tmp_path / "car" / "crop_car_001.jpg")
    shutil.copy(SAMPLE / "vehicles" / "car" / "car071.jpg", tmp_path / "car" / "car071.jpg")
    samples = labelled_folder(tmp_path)
    assert [(s.path.name, s.label) for s in samples] == [("web_bus_001.jpg", 0), ("car071.jpg", 1), ("crop_car_001.jpg", 1)]
    assert [source_group(s.path) for s in samples] == ["web", "", "crop"]
    for c in ("bus", "car", "truck"):
        (tmp_path / "empty" / c).mkdir(parents=True)
    with pytest.raises(DataError, match="empty holds no images"):
        labelled_folder(tmp_path / "empty")
