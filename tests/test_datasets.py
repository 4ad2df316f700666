"""Synthetic datasets 501/502: deterministic, labels agree with images, and nnU-Net accepts them."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from geodiag.diagnostics.cli import main
from geodiag.diagnostics.nnunet.datasets import SPECS, make_dataset
from geodiag.diagnostics.instruments.errors import GeodiagError


def _load(folder, split="Tr"):
    images = sorted((folder / f"images{split}").glob("*.png"))
    labels = sorted((folder / f"labels{split}").glob("*.png"))
    return [np.asarray(Image.open(p)) for p in images], [np.asarray(Image.open(p)) for p in labels]


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    first = _load(make_dataset(501, tmp_path / "a", num=3, size=64, seed=5))
    again = _load(make_dataset(501, tmp_path / "b", num=3, size=64, seed=5))
    other = _load(make_dataset(501, tmp_path / "c", num=3, size=64, seed=6))
    for x, y in zip(first[0] + first[1], again[0] + again[1]):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(first[1], other[1]))


@pytest.mark.parametrize("dataset_id, counts", [(501, range(2, 6)), (502, range(1, 2))])
def test_each_label_has_the_dataset_circle_count_and_circles_are_bright(tmp_path, dataset_id, counts):
    images, labels = _load(make_dataset(dataset_id, tmp_path, num=8, size=128, seed=0))
    for image, label in zip(images, labels):
        assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
        assert image.shape == label.shape == (128, 128)
        _, n = ndimage.label(label)
        assert n in counts
        # Circles are brighter than the background by far more than the noise of a mean over many pixels.
        assert image[label == 1].mean() > image[label == 0].mean() + 40


def test_circles_are_disks_of_the_stated_size_range(tmp_path):
    spec = SPECS[502]
    _, labels = _load(make_dataset(502, tmp_path, num=6, size=200, seed=3))
    for label in labels:
        radius = np.sqrt(label.sum() / np.pi)
        assert spec.min_radius * 200 - 1 <= radius <= spec.max_radius * 200 + 1
        # A disk fills pi/4 of its bounding box.
        rows, cols = np.nonzero(label)
        box = (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
        assert label.sum() / box == pytest.approx(np.pi / 4, abs=0.03)


def test_dataset_json_and_test_split_pass_nnunet_verification(tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    folder = make_dataset(502, tmp_path, num=5, size=48, seed=1, num_test=2)
    meta = json.loads((folder / "dataset.json").read_text())
    assert folder.name == "Dataset502_Shapes_One"
    assert meta["channel_names"] == {"0": "gray"}
    assert meta["labels"] == {"background": 0, "circle": 1}
    assert meta["numTraining"] == 5 and meta["file_ending"] == ".png"
    assert len(list((folder / "imagesTs").glob("*_0000.png"))) == len(list((folder / "labelsTs").glob("*.png"))) == 2
    verify_dataset_integrity(str(folder), num_processes=1)


def test_rewriting_with_fewer_cases_leaves_no_stale_files(tmp_path):
    make_dataset(502, tmp_path, num=6, size=48, num_test=2)
    folder = make_dataset(502, tmp_path, num=3, size=48)
    assert len(list((folder / "imagesTr").iterdir())) == 3
    assert not (folder / "imagesTs").exists()


@pytest.mark.parametrize("argv, message", [
    (["make-dataset", "503"], "unknown synthetic dataset"),
    (["make-dataset", "502", "--num", "0"], "--num must be at least 1"),
    (["make-dataset", "502", "--size", "16"], "--size must be at least"),
    (["make-dataset", "502", "--num-test", "-1"], "--num-test"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, message):
    assert main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(GeodiagError, match="not a folder"):
        make_dataset(502, tmp_path / "file", num=1, size=32)
