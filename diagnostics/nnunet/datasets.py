"""Synthetic nnU-Net raw datasets of bright circles on a noisy background: the seed's 501 and 502.

Dataset501_Shapes_Multi has 2-5 disjoint circles per image (where the seed's V2.3 trained), Dataset502_Shapes_One
one circle (where it went NaN). Images are grayscale PNGs (circles brighter than the background, a mild blur,
Gaussian noise), labels 0/1 PNGs; everything is a function of the seed (numpy Generator).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ..instruments.errors import ArgumentError, GeodiagError

MIN_SIZE = 32
FILE_ENDING = ".png"
# Gap kept between circles (in pixels) so that connected components of the label are one circle each.
CIRCLE_GAP = 3
BLUR_SIGMA = 1.0
NOISE_SIGMA = 18.0


@dataclass(frozen=True)
class DatasetSpec:
    """What distinguishes the two synthetic datasets."""

    dataset_id: int
    name: str
    min_circles: int
    max_circles: int
    # Radii as fractions of the image side.
    min_radius: float
    max_radius: float

    @property
    def folder_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.name}"


SPECS: dict[int, DatasetSpec] = {
    501: DatasetSpec(501, "Shapes_Multi", 2, 5, 0.05, 0.12),
    502: DatasetSpec(502, "Shapes_One", 1, 1, 0.08, 0.22),
}


@dataclass(frozen=True)
class Circle:
    cy: float
    cx: float
    radius: float


def dataset_spec(dataset_id: int) -> DatasetSpec:
    """The spec of a synthetic dataset id; GeodiagError for any other id."""
    try:
        return SPECS[int(dataset_id)]
    except (KeyError, ValueError):
        raise GeodiagError(f"unknown synthetic dataset {dataset_id!r}; choose one of {', '.join(map(str, SPECS))}") from None


def sample_circles(rng: np.random.Generator, spec: DatasetSpec, size: int) -> list[Circle]:
    """Circles inside the image, pairwise separated by at least CIRCLE_GAP pixels (rejection sampling)."""
    count = int(rng.integers(spec.min_circles, spec.max_circles + 1))
    circles: list[Circle] = []
    while len(circles) < count:
        circles = []
        for _ in range(200 * count):
            radius = float(rng.uniform(spec.min_radius, spec.max_radius) * size)
            margin = radius + 2
            cy, cx = (float(v) for v in rng.uniform(margin, size - 1 - margin, size=2))
            if all(np.hypot(cy - c.cy, cx - c.cx) >= radius + c.radius + CIRCLE_GAP for c in circles):
                circles.append(Circle(cy, cx, radius))
                if len(circles) == count:
                    break
    return circles


def render_case(rng: np.random.Generator, spec: DatasetSpec, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 [size, size], label uint8 0/1 [size, size]) pair."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    label = np.zeros((size, size), dtype=np.uint8)
    for c in sample_circles(rng, spec, size):
        label[(yy - c.cy) ** 2 + (xx - c.cx) ** 2 <= c.radius ** 2] = 1
    background = rng.uniform(40.0, 80.0)
    contrast = rng.uniform(70.0, 120.0)
    clean = ndimage.gaussian_filter(background + contrast * label.astype(np.float64), BLUR_SIGMA)
    image = clean + rng.normal(0.0, NOISE_SIGMA, size=clean.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def dataset_json(spec: DatasetSpec, num_training: int, generator: dict) -> dict:
    """nnU-Net's dataset.json: one gray channel (z-scored), background/circle labels, PNG files."""
    return {
        "channel_names": {"0": "gray"},
        "labels": {"background": 0, "circle": 1},
        "numTraining": num_training,
        "file_ending": FILE_ENDING,
        "name": spec.folder_name,
        "description": f"geodiag synthetic: {spec.min_circles}-{spec.max_circles} bright circle(s) per image, "
                       "Gaussian blur and noise",
        "geodiag_generator": generator,
    }


def _write_split(folder: Path, prefix: str, cases: list[tuple[np.ndarray, np.ndarray]], images: str, labels: str) -> None:
    for sub in (images, labels):
        shutil.rmtree(folder / sub, ignore_errors=True)
        (folder / sub).mkdir(parents=True)
    for index, (image, label) in enumerate(cases):
        case = f"{prefix}_{index:03d}"
        Image.fromarray(image).save(folder / images / f"{case}_0000{FILE_ENDING}")
        Image.fromarray(label).save(folder / labels / f"{case}{FILE_ENDING}")


def make_dataset(dataset_id: int, raw_dir: str | Path, num: int = 100, size: int = 512, seed: int = 0,
                 num_test: int = 0) -> Path:
    """Write DatasetXXX_* under ``raw_dir`` (imagesTr/labelsTr, optional imagesTs/labelsTs); returns its folder.

    Existing image folders of that dataset are replaced, so a smaller ``num`` leaves no stale cases behind.
    """
    spec = dataset_spec(dataset_id)
    if num < 1:
        raise ArgumentError(f"{{num}} must be at least 1, got {num}", "num")
    if num_test < 0:
        raise ArgumentError(f"{{num_test}} must be >= 0, got {num_test}", "num_test")
    if size < MIN_SIZE:
        raise ArgumentError(f"{{size}} must be at least {MIN_SIZE} pixels, got {size}", "size")
    raw_dir = Path(raw_dir)
    if raw_dir.exists() and not raw_dir.is_dir():
        raise GeodiagError(f"output {raw_dir} exists and is not a folder")
    folder = raw_dir / spec.folder_name
    if folder.exists() and not folder.is_dir():
        raise GeodiagError(f"{folder} exists and is not a folder")

    rng = np.random.default_rng(seed)
    training = [render_case(rng, spec, size) for _ in range(num)]
    test = [render_case(rng, spec, size) for _ in range(num_test)]
    folder.mkdir(parents=True, exist_ok=True)
    prefix = spec.name.lower()
    _write_split(folder, prefix, training, "imagesTr", "labelsTr")
    if test:
        _write_split(folder, f"{prefix}_test", test, "imagesTs", "labelsTs")
    else:
        for sub in ("imagesTs", "labelsTs"):
            shutil.rmtree(folder / sub, ignore_errors=True)
    generator = {"num": num, "size": size, "seed": seed, "num_test": num_test}
    (folder / "dataset.json").write_text(json.dumps(dataset_json(spec, num, generator), indent=2) + "\n")
    return folder


def generator_settings(folder: str | Path) -> dict | None:
    """The generator settings recorded in a dataset.json written by make_dataset, or None."""
    path = Path(folder) / "dataset.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("geodiag_generator")
    except (OSError, json.JSONDecodeError):
        return None
