"""The study's data: the synthetic datasets, and nnU-Net's plans for them with the study's batch size written into
the tiny configuration. Both are reused when an earlier run of the study left them as wanted."""
from __future__ import annotations

import json

from geodiag.reports import schema

from ..nnunet.datasets import dataset_spec, generator_settings, make_dataset
from ..nnunet.plans import PLANS_NAME, TINY_CONFIGURATION, plan_and_preprocess
from .definition import Study


def make_data(study: Study) -> None:
    for dataset_id in study.datasets:
        folder = study.dirs.raw / dataset_spec(dataset_id).folder_name
        wanted = {"num": study.num_images, "size": study.image_size, "seed": study.seed, "num_test": 0}
        if generator_settings(folder) == wanted:
            study.log(f"  reusing {folder}")
            continue
        make_dataset(dataset_id, study.dirs.create().raw, num=study.num_images, size=study.image_size, seed=study.seed)
        study.log(f"  wrote {study.num_images} images of {study.image_size}² to {folder}")


def plan(study: Study) -> None:
    for dataset_id in study.datasets:
        name = dataset_spec(dataset_id).folder_name
        plans_file = study.dirs.preprocessed / name / f"{PLANS_NAME}.json"
        raw_json = study.dirs.raw / name / "dataset.json"
        if not (plans_file.is_file() and plans_file.stat().st_mtime >= raw_json.stat().st_mtime):
            study.log(f"  nnUNetv2_plan_and_preprocess -d {dataset_id} (about 20 s), then configuration "
                      f"{TINY_CONFIGURATION}")
            plan_and_preprocess(dataset_id, study.dirs)
        plans = schema.read_json(plans_file)
        tiny = plans["configurations"][TINY_CONFIGURATION]
        if study.batch_size is not None and tiny.get("batch_size") != study.batch_size:
            tiny["batch_size"] = study.batch_size  # the seed's batch (the reference study sets it)
            plans_file.write_text(json.dumps(plans, indent=4) + "\n")
        study.log(f"  {plans_file}: {TINY_CONFIGURATION}, batch size "
                  f"{tiny.get('batch_size') or plans['configurations']['2d']['batch_size']}")
