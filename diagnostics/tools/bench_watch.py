"""What ``geodiag watch`` costs: nnU-Net's own ``nnUNetTrainer.train_step`` plain, under watch's always-on
recording, and with its sampled steps every 16 iterations (histograms, masked values, swallowed errors, and with
``--loss`` the prior's share), side by side on one fixed batch.

The trainer is a real ``nnUNetTrainer``, built from an in-memory plan at the bench's scale (PlainConvUNet with the
scale's features, the scale's patch and batch, nnU-Net's optimizer, loss and clip), so no dataset has to be planned:
nnU-Net only looks into the preprocessed folder to pick its dataset class, so it holds one empty placeholder file.
"""
from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import torch

from geodiag.losses import GeometricLoss
from geodiag.losses.nnunet.patches import patch_environ

from ..nnunet.watch import Watch, WatchOptions
from ..nonfinite.loss_spec import as_user_loss
from .bench_common import Clock, Result, Scale, interleaved_medians, ratio_row
from .bench_step import disk_labels, net_name

SAMPLE_STEPS = 16  # steps per timed sample: a multiple of the sampled variants' every
EVERY_NEVER = 10 ** 9  # always-on statistics only: histograms and the state scan at the first iteration alone
DATASET = "Dataset999_GeodiagBench"
# (name, watch's every or None for no watch, target ratio to the plain step, with a --loss prior). "plain, again"
# is a second unwatched trainer: its ratio to "plain" is the noise floor of the measurement on this machine. Every
# sampled step also runs the masked-value and swallowed-error checks over the trainer's own code.
VARIANTS = (("plain", None, None, False), ("plain, again", None, None, False), ("always on", EVERY_NEVER, 1.03, False),
            ("every 16", 16, 1.06, False), ("every 16 with --loss", 16, 1.06, True))


def _plans(scale: Scale) -> dict:
    """nnU-Net's plans for a 2D PlainConvUNet at the bench's scale (the layout nnUNetv2_plan_and_preprocess writes)."""
    stages = len(scale.features)
    conv = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": stages, "features_per_stage": list(scale.features),
                            "conv_op": "torch.nn.modules.conv.Conv2d", "kernel_sizes": [[3, 3]] * stages,
                            "strides": [[1, 1]] + [[2, 2]] * (stages - 1), "n_conv_per_stage": [2] * stages,
                            "n_conv_per_stage_decoder": [2] * (stages - 1), "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    resample = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    size = [scale.step_size, scale.step_size]
    configuration = {
        "data_identifier": "bench_2d", "preprocessor_name": "DefaultPreprocessor", "batch_size": scale.step_batch,
        "patch_size": size, "median_image_size_in_voxels": [float(n) for n in size], "spacing": [1.0, 1.0],
        "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resample, "resampling_fn_seg_kwargs": {**resample, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**resample, "order": 1}, "architecture": conv, "batch_dice": True}
    return {"dataset_name": DATASET, "plans_name": "nnUNetPlans", "continue_training": False,
            "original_median_spacing_after_transp": [999.0, 1.0, 1.0],
            "original_median_shape_after_transp": [1, *size], "image_reader_writer": "NaturalImage2DIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": {"max": 1.0, "mean": 0.0, "median": 0.0,
                                                                  "min": -1.0, "percentile_00_5": -1.0,
                                                                  "percentile_99_5": 1.0, "std": 1.0}},
            "configurations": {"2d": configuration}}


def nnunet_trainer(scale: Scale, device: torch.device, folder: str):
    """An initialised ``nnUNetTrainer`` for ``_plans(scale)``, writing under ``folder``; same seed, same weights."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    preprocessed = Path(folder) / "preprocessed"
    (preprocessed / DATASET / "bench_2d").mkdir(parents=True, exist_ok=True)
    (preprocessed / DATASET / "bench_2d" / "placeholder.npz").touch()
    dataset_json = {"channel_names": {"0": "gray"}, "labels": {"background": 0, "disk": 1}, "numTraining": 1,
                    "file_ending": ".png"}
    torch.manual_seed(0)
    with patch_environ({"nnUNet_results": str(Path(folder) / "results"), "nnUNet_preprocessed": str(preprocessed)}), \
            contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's banner and log lines
        trainer = nnUNetTrainer(_plans(scale), "2d", 0, dataset_json, device)
        trainer.initialize()
    return trainer


def disk_batch(trainer, device: torch.device) -> dict:
    """Disks in noise at the trainer's patch size, with nnU-Net's deep-supervision targets."""
    generator = torch.Generator().manual_seed(0)
    label = disk_labels(trainer.batch_size, trainer.configuration_manager.patch_size, generator).float()
    data = label + 0.5 * torch.randn(label.shape, generator=generator)
    scales = trainer._get_deep_supervision_scales()
    targets = [label[..., ::round(1 / s[0]), ::round(1 / s[1])].to(device) for s in scales]
    return {"data": data.to(device), "target": targets, "keys": [f"disk_{i}" for i in range(trainer.batch_size)]}


def bench_watch(scale: Scale, device: torch.device, clock: Clock) -> list[Result]:
    """Each variant is its own trainer (same seed, same weights) on the same batch; watch's progress is silenced."""
    variants, watches = {}, []
    prior = as_user_loss(GeometricLoss.from_preset("production"), "geodiag's production GeometricLoss")
    with tempfile.TemporaryDirectory() as folder:
        for name, every, _, with_prior in VARIANTS:
            trainer = nnunet_trainer(scale, device, f"{folder}/{len(variants)}")
            if every is not None:
                watches.append(Watch(trainer, WatchOptions(every=every), progress=lambda message: None,
                                     prior=prior if with_prior else None).attach())
                watches[-1].start()
            batch = disk_batch(trainer, device)
            variants[name] = lambda trainer=trainer, batch=batch: trainer.train_step(batch)
        try:
            # 16 steps a sample: each sample of an every-16 variant holds exactly one sampled step, so the median
            # cannot leave the sampled steps out
            times = interleaved_medians(variants, clock, max(scale.repeats, 3), SAMPLE_STEPS)
        finally:
            for watch in reversed(watches):  # each undoes its own patches: last attached, first detached
                watch.detach()
    method = (f"nnUNetTrainer.train_step {scale.step_batch}x1x{scale.step_size}^2, {net_name(scale)}; {clock.name}; "
              f"median of {max(scale.repeats, 3)} interleaved samples of {SAMPLE_STEPS} steps")
    rows = [ratio_row("watch overhead", "a second plain trainer (noise floor)", "plain step",
                      times["plain, again"] / times["plain"], "", None, method)]
    for name, _, target, _ in VARIANTS[2:]:
        ratio = times[name] / times["plain"]
        rows.append(ratio_row("watch overhead", f"geodiag watch, {name}", "plain step", ratio, f"<= {target}x",
                              ratio <= target, method))
    return rows
