"""Bad input through the real CLI: one line that names the problem, exit status 2, never a traceback."""
from __future__ import annotations

import ast
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoint_faults import write_modified
from geodiag.diagnostics.nnunet.checkpoint import find_checkpoints, load_checkpoint
from geodiag.diagnostics.cli import main
from geodiag.diagnostics.cli.options import flag
from geodiag.diagnostics.instruments.errors import ArgumentError
from geodiag.diagnostics.tools.analyze import analyze_checkpoint

log = logging.getLogger(__name__)


def _one_line_error(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI; it must exit 2 with one error line, the last on stderr, holding every needle (progress lines
    of cases finished before the bad one may precede it)."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error" in line.lower() or "Traceback" in line]
    log.info("%s -> exit %s: %s", " ".join(map(str, argv)), code, errors)
    assert code == 2, err
    assert errors == err[-1:], err
    assert errors[0].startswith(f"geodiag {argv[0]}: error: ")
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def _argparse_error(capsys, argv: list[str], *needles: str) -> str:
    """argparse's own rejection: exit 2 and one error line naming the problem."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    log.info("%s -> exit %s: %s", " ".join(map(str, argv)), exit_.value.code, err[-1])
    assert exit_.value.code == 2
    assert len(err) == 1 and err[0].startswith("geodiag ") and ": error: " in err[0]
    for needle in needles:
        assert needle in err[-1], (needle, err[-1])
    return err[-1]


def _analyze(checkpoint, out, *options) -> list[str]:
    return ["analyze-checkpoint", checkpoint, "--out", out, *options]


@pytest.fixture(scope="module")
def checkpoint(stock_run):
    return stock_run.final_checkpoint


@pytest.fixture(scope="module")
def raw_dataset(tiny_dataset_502):
    return tiny_dataset_502.dirs.raw / tiny_dataset_502.name


# ---------------------------------------------------------------------- the checkpoint file itself
def test_missing_checkpoint(capsys, tmp_path):
    _one_line_error(capsys, _analyze(tmp_path / "nope.pth", tmp_path / "out"), "not found", "nope.pth")


def test_empty_checkpoint(capsys, tmp_path):
    (tmp_path / "empty.pth").touch()
    _one_line_error(capsys, _analyze(tmp_path / "empty.pth", tmp_path / "out"), "empty (0 bytes)")


def test_truncated_checkpoint(capsys, tmp_path, checkpoint):
    data = checkpoint.read_bytes()
    (tmp_path / "half.pth").write_bytes(data[: len(data) // 2])
    _one_line_error(capsys, _analyze(tmp_path / "half.pth", tmp_path / "out"), "not a readable PyTorch checkpoint",
                    "truncated")


def test_png_given_as_checkpoint(capsys, tmp_path, raw_dataset):
    png = next((raw_dataset / "imagesTr").glob("*.png"))
    _one_line_error(capsys, _analyze(png, tmp_path / "out"), "is not a PyTorch checkpoint", "PNG")


def test_json_given_as_checkpoint(capsys, tmp_path, raw_dataset):
    _one_line_error(capsys, _analyze(raw_dataset / "dataset.json", tmp_path / "out"),
                    "is not a PyTorch checkpoint", "b'{")


def test_saved_tensor_given_as_checkpoint(capsys, tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    _one_line_error(capsys, _analyze(tmp_path / "tensor.pth", tmp_path / "out"), "not an nnU-Net checkpoint",
                    "found Tensor")


@pytest.mark.parametrize("change,needles", [
    (lambda d: d["init_args"].__setitem__("configuration", "3d_fullres"),
     ("configuration '3d_fullres' is not in its plans", "2d_tiny")),
    (lambda d: d["init_args"].pop("dataset_json"), ("init_args['dataset_json'] is missing",)),
    (lambda d: d["init_args"].pop("plans"), ("init_args['plans'] is missing",)),
    (lambda d: d.__setitem__("network_weights", [1, 2]), ("'network_weights' is not a state dict",)),
], ids=["unknown-configuration", "no-dataset-json", "no-plans", "weights-not-a-dict"])
def test_checkpoint_with_unusable_contents(capsys, tmp_path, checkpoint, change, needles):
    broken = write_modified(checkpoint, tmp_path / "broken.pth", change)
    _one_line_error(capsys, _analyze(broken, tmp_path / "out"), *needles)


# ---------------------------------------------------------------------- results folders
def test_results_folder_without_folds(capsys, tmp_path, raw_dataset):
    shutil.copy(raw_dataset / "dataset.json", tmp_path / "dataset.json")
    (tmp_path / "plans.json").write_text("{}")
    _one_line_error(capsys, _analyze(tmp_path, tmp_path / "out"), "no fold_* folder")


def test_folder_that_is_not_a_results_folder(capsys, tmp_path):
    _one_line_error(capsys, _analyze(tmp_path, tmp_path / "out"), "neither a checkpoint nor an nnU-Net results folder")


def test_unknown_fold(capsys, tmp_path, stock_run):
    _one_line_error(capsys, _analyze(stock_run.output_folder.parent, tmp_path / "out", "--fold", "7"),
                    "no fold_7 folder")


def test_fold_folder_without_checkpoint(capsys, tmp_path):
    (tmp_path / "trainer" / "fold_0").mkdir(parents=True)
    _one_line_error(capsys, _analyze(tmp_path / "trainer", tmp_path / "out"), "no checkpoint in")


def test_results_folder_without_plans_and_dataset_json_uses_the_checkpoints_own(tmp_path, checkpoint):
    """Not an error: a checkpoint carries its plans and dataset.json (init_args), so the folder's copies are
    not needed."""
    fold = tmp_path / "trainer" / "fold_0"
    fold.mkdir(parents=True)
    shutil.copy(checkpoint, fold / "checkpoint_final.pth")
    (found,) = find_checkpoints(tmp_path / "trainer")
    assert found == fold / "checkpoint_final.pth"
    assert load_checkpoint(found).configuration == "2d_tiny"


# ---------------------------------------------------------------------- cases
def _png(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_and_label_of_different_sizes(capsys, tmp_path, checkpoint):
    _png(tmp_path / "cases" / "imagesTr" / "odd_0000.png", np.zeros((64, 64), np.uint8))
    _png(tmp_path / "cases" / "labelsTr" / "odd.png", np.zeros((32, 48), np.uint8))
    _one_line_error(capsys, _analyze(checkpoint, tmp_path / "out", "--cases", tmp_path / "cases"),
                    "case odd", "(1, 64, 64)", "(1, 32, 48)", "differ")


def test_rgb_image_for_a_grey_scale_checkpoint(capsys, tmp_path, checkpoint):
    _png(tmp_path / "cases" / "imagesTr" / "rgb_0000.png", np.zeros((64, 64, 3), np.uint8))
    _png(tmp_path / "cases" / "labelsTr" / "rgb.png", np.zeros((64, 64), np.uint8))
    _one_line_error(capsys, _analyze(checkpoint, tmp_path / "out", "--cases", tmp_path / "cases"),
                    "case rgb", "3 image channels", "trained on 1")


@pytest.fixture
def float_image_checkpoint(checkpoint, tmp_path):
    """The stock checkpoint with plans that read MetaImage (.mha) through SimpleITK: PNG cannot hold NaN.

    nnU-Net picks the reader from the plans (``image_reader_writer``) and the file ending from dataset.json, so
    this is how a float-image dataset reaches geodiag. Not .nii.gz: SimpleITK 2.5.7 reads NaN and Inf in a
    float NIfTI file as 0 (measured), so they never reach nnU-Net that way; .mha keeps them."""
    def to_metaimage(data: dict) -> None:
        data["init_args"]["plans"]["image_reader_writer"] = "SimpleITKIO"
        data["init_args"]["dataset_json"]["file_ending"] = ".mha"

    return write_modified(checkpoint, tmp_path / "metaimage.pth", to_metaimage)


def _metaimage(path, array) -> None:
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


@pytest.mark.parametrize("value,counts", [(np.nan, "2 NaN and 0 Inf"), (np.inf, "0 NaN and 2 Inf")],
                         ids=["nan", "inf"])
def test_non_finite_intensities_in_an_image(capsys, tmp_path, float_image_checkpoint, value, counts):
    image = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    image[10, 10:12] = value
    _metaimage(tmp_path / "cases" / "imagesTr" / "bad_0000.mha", image)
    _metaimage(tmp_path / "cases" / "labelsTr" / "bad.mha", (image > 1).astype(np.uint8))
    _one_line_error(capsys, _analyze(float_image_checkpoint, tmp_path / "out", "--cases", tmp_path / "cases"),
                    "case bad", counts)


def test_image_of_unsupported_dimensionality(capsys, tmp_path, float_image_checkpoint):
    """A 4D volume: SimpleITK reads it as several channels of a 3D image; geodiag names the mismatch."""
    _metaimage(tmp_path / "cases" / "imagesTr" / "vol_0000.mha", np.zeros((2, 3, 64, 64), np.float32))
    _metaimage(tmp_path / "cases" / "labelsTr" / "vol.mha", np.zeros((3, 64, 64), np.uint8))
    _one_line_error(capsys, _analyze(float_image_checkpoint, tmp_path / "out", "--cases", tmp_path / "cases"),
                    "case vol", "image channels")


def test_unknown_case_name(capsys, tmp_path, checkpoint):
    _one_line_error(capsys, _analyze(checkpoint, tmp_path / "out", "--cases", "shapes_one_000,no_such_case"),
                    "unknown case(s) no_such_case")


def test_cases_pointing_at_a_file(capsys, tmp_path, checkpoint, raw_dataset):
    _one_line_error(capsys, _analyze(checkpoint, tmp_path / "out", "--cases", raw_dataset / "dataset.json"),
                    "is a file")


def test_cases_folder_without_images(capsys, tmp_path, checkpoint):
    (tmp_path / "cases").mkdir()
    _one_line_error(capsys, _analyze(checkpoint, tmp_path / "out", "--cases", tmp_path / "cases"),
                    "no cases (*_0000.png) found")


def test_max_cases_zero(capsys, tmp_path, checkpoint):
    _one_line_error(capsys, _analyze(checkpoint, tmp_path / "out", "--max-cases", "0"), "--max-cases")


# ---------------------------------------------------------------------- output folders
def test_analysis_output_folder_that_is_a_file(capsys, tmp_path, checkpoint):
    (tmp_path / "file").touch()
    _one_line_error(capsys, _analyze(checkpoint, tmp_path / "file"), "--out", "exists and is not a folder")


def test_a_library_error_names_the_argument_and_the_cli_its_flag(tmp_path):
    """A notebook calling analyze_checkpoint(out=...) is told about ``out``, not about a flag it never typed."""
    (tmp_path / "file").touch()
    with pytest.raises(ArgumentError) as error:
        analyze_checkpoint("unused.pth", tmp_path / "file")
    assert str(error.value) == f"out {tmp_path / 'file'} exists and is not a folder"
    assert error.value.spelled(flag) == f"--out {tmp_path / 'file'} exists and is not a folder"
    assert [flag(a) for a in ("trust", "precisions", "count", "num_test")] == \
        ["--trust-checkpoint", "--precision", "--patches", "--num-test"]


def test_analysis_output_folder_under_a_file(capsys, tmp_path, checkpoint):
    (tmp_path / "file").touch()
    _one_line_error(capsys, _analyze(checkpoint, tmp_path / "file" / "out"), "cannot write to --out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder; the under-a-file case covers "
                                              "an unwritable --out")
def test_analysis_output_folder_without_write_permission(capsys, tmp_path, checkpoint):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    _one_line_error(capsys, _analyze(checkpoint, locked / "out"), "cannot write to --out")


@pytest.mark.parametrize("argv,flag_", [(["make-dataset", "501", "--out", ""], "--out"),
                                         (["demo", "--out", " "], "--out"),
                                         (["clamp-sweep", "x.pth", "--out", ""], "--out"),
                                         (["reference-report", "--work", ""], "--work"),
                                         (["bench", "--out", ""], "--out"),
                                         (["check-bounds", "--junit", ""], "--junit"),
                                         (["watch", "--tensorboard", "", "--", "nnUNetv2_train"], "--tensorboard")])
def test_an_empty_path_is_refused_rather_than_meaning_the_current_folder(capsys, tmp_path, monkeypatch, argv,
                                                                         flag_):
    monkeypatch.chdir(tmp_path)
    _argparse_error(capsys, argv, f"argument {flag_}: empty")
    assert not any(tmp_path.iterdir())  # nothing written where the empty path would have pointed


def test_sweep_output_folder_that_is_a_file(capsys, tmp_path, checkpoint):
    (tmp_path / "file").touch()
    _one_line_error(capsys, ["clamp-sweep", checkpoint, "--out", tmp_path / "file"], "exists and is not a folder")


def test_sweep_output_folder_under_a_file(capsys, tmp_path, checkpoint):
    (tmp_path / "file").touch()
    _one_line_error(capsys, ["clamp-sweep", checkpoint, "--out", tmp_path / "file" / "out"], "cannot write to --out")


# ---------------------------------------------------------------------- library errors name arguments, the CLI flags
LIBRARY_ROOTS = ("diagnostics", "losses", "reports")
ERROR_TYPES = {"GeodiagError", "ArgumentError", "ReportInputError"}


def test_no_library_error_message_spells_a_flag():
    """Flags are the CLI's (diagnostics/cli/); everywhere else an error names the argument and the CLI maps it."""
    root = Path(__file__).parent.parent
    spelled = []
    for path in sorted(p for name in LIBRARY_ROOTS for p in (root / name).rglob("*.py")):
        if path.relative_to(root).parts[:2] == ("diagnostics", "cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            called = getattr(node, "func", None)
            if isinstance(node, ast.Call) and getattr(called, "id", getattr(called, "attr", None)) in ERROR_TYPES:
                text = "".join(c.value for c in ast.walk(node)
                               if isinstance(c, ast.Constant) and isinstance(c.value, str))
                if re.search(r"(?<![\w-])--[a-z]", text):
                    spelled.append(f"{path.relative_to(root)}:{node.lineno}: {text[:60]!r}")
    assert not spelled, spelled


def test_own_loss_and_site_sweep_errors_name_arguments_for_a_library_caller(tmp_path):
    from geodiag.diagnostics.tools.own_loss import choose_loss
    from geodiag.diagnostics.tools.site_sweep import run_site_sweep

    (tmp_path / "my_loss.py").write_text("def area(pred):\n    return pred[:, 1].clamp(min=1e-4).sum()\n")
    loss = f"{tmp_path / 'my_loss.py'}:area"
    with pytest.raises(ArgumentError) as error:
        choose_loss(None, (1,), loss, stabilizer="clamp")
    assert str(error.value) == "stabilizer and eps set GeometricLoss's settings; a loss_spec is analysed as it is"
    assert error.value.spelled(flag) == \
        "--stabilizer and --eps set GeometricLoss's settings; a --loss is analysed as it is"
    for sites, eps, message in (([], [1e-2], "sites needs at least one FILE:LINE"),
                                (["my_loss.py:2"], [float("nan")], "eps must be finite numbers")):
        with pytest.raises(ArgumentError) as error:
            run_site_sweep(["unused.pth"], tmp_path / "out", loss, sites, eps)
        assert str(error.value) == message
    (tmp_path / "file").touch()
    with pytest.raises(ArgumentError) as error:
        run_site_sweep(["unused.pth"], tmp_path / "file" / "out", loss, ["my_loss.py:2"], [1e-2])
    assert str(error.value).startswith(f"cannot write to out {tmp_path / 'file' / 'out'}")


@pytest.mark.parametrize("options,needle", [(["--eps", "nan"], "--eps must be finite numbers"),
                                            (["--out", "file/out"], "cannot write to --out")])
def test_site_sweep_errors_name_the_flag(capsys, tmp_path, monkeypatch, options, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").touch()
    (tmp_path / "my_loss.py").write_text("def area(pred):\n    return pred[:, 1].clamp(min=1e-4).sum()\n")
    _one_line_error(capsys, ["clamp-sweep", "unused.pth", "--loss", "my_loss.py:area", "--site", "my_loss.py:2",
                             "--out", "out", "--eps", "1e-2", *options], needle)


# ---------------------------------------------------------------------- settings
@pytest.mark.parametrize("eps,needle", [("-1", "eps must be a finite number >= 0"),
                                        ("nan", "eps must be a finite number >= 0"),
                                        ("inf", "eps must be a finite number >= 0")])
def test_invalid_eps_for_an_analysis(capsys, tmp_path, checkpoint, eps, needle):
    _one_line_error(capsys, _analyze(checkpoint, tmp_path / "out", "--eps", eps, "--max-cases", "1"), needle)


def test_invalid_stabilizer_for_an_analysis(capsys, tmp_path, checkpoint):
    _argparse_error(capsys, _analyze(checkpoint, tmp_path / "out", "--stabilizer", "clip"), "invalid choice: 'clip'")


def test_eps_that_is_not_a_number(capsys, tmp_path, checkpoint):
    _argparse_error(capsys, _analyze(checkpoint, tmp_path / "out", "--eps", "small"), "invalid float value: 'small'")


@pytest.mark.parametrize("options,needle", [
    (["--stabilizers", "clip"], "unknown stabilizer"),
    (["--eps", "1e-4,-1"], "eps must be a finite number >= 0"),
    (["--precision", "fp8"], "unknown precision 'fp8'"),
])
def test_invalid_sweep_settings(capsys, tmp_path, checkpoint, options, needle):
    _one_line_error(capsys, ["clamp-sweep", checkpoint, "--out", tmp_path / "out", *options], needle)


def test_invalid_precision_for_an_analysis(capsys, tmp_path, checkpoint):
    _one_line_error(capsys, _analyze(checkpoint, tmp_path / "out", "--precision", "fp8"), "unknown precision 'fp8'")



# ---------------------------------------------------------------------- check-bounds: 1 is a regression, never a crash
def test_a_loss_that_crashes_in_check_bounds_is_a_failing_row_naming_its_line(capsys, tmp_path, monkeypatch):
    """A researcher's loss with a shape bug: the case fails with the exception and the user's line, exit 1
    (a finding about the loss), never a traceback."""
    (tmp_path / "crashing_user_loss.py").write_text(
        "import torch\n\n"
        "def dice_with_shape_bug(probs, target):\n"
        "    fg = probs[:, 1]\n"
        "    inter = (fg * target.squeeze(1)).sum(dim=(1, 2, 3))  # [B, H, W] has no dim 3\n"
        "    return 1 - (2 * inter / (fg.sum() + target.sum()).clamp_min(1e-6)).mean()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["check-bounds", "--loss", "crashing_user_loss:dice_with_shape_bug", "--cases", "tiny_disk",
                 "--precisions", "fp32"])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    raised = [line for line in captured.out.splitlines() if line.startswith("RAISED")]
    assert len(raised) == 1 and "IndexError" in raised[0] and "crashing_user_loss.py:5" in raised[0]
    assert "Traceback" not in captured.out + captured.err
