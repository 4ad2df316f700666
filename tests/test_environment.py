"""`geodiag env` and `geodiag doctor`: nnU-Net finds geodiag's trainer, and a shadowing stale copy is caught."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path


import geodiag.losses.nnunet.trainer as trainer_module
from geodiag.losses import preset_kwargs
from geodiag.diagnostics.nnunet import environment
from geodiag.diagnostics.cli import main
from geodiag.diagnostics.nnunet.environment import EXT_TRAINER_VAR, diagnose, ext_trainer_value, trainer_folders

SHIM = Path(trainer_module.__file__).parent.parent / "nnunet_ext"  # losses/nnunet_ext


def _env_lines(*args: str, env: dict | None = None) -> list[str]:
    return subprocess.run([sys.executable, "-m", "geodiag.diagnostics.cli", "env", *args], check=True,
                          capture_output=True, text=True, env=env).stdout.splitlines()


def _evaluated(lines: list[str], name: str) -> str:
    script = "\n".join(lines) + f'\nprintf %s "${name}"'
    return subprocess.run(["bash", "-c", script], check=True, capture_output=True, text=True).stdout


def test_env_exports_the_shim_folder_first_and_keeps_other_folders(tmp_path):
    other = str(tmp_path / "my trainers")
    lines = _env_lines(env={**os.environ, EXT_TRAINER_VAR: os.pathsep.join([other, str(SHIM)])})
    assert lines == [line for line in lines if line.startswith("export ")]
    value = _evaluated(lines, EXT_TRAINER_VAR).split(os.pathsep)
    assert value[0] == str(SHIM) and value[-1] == other and value.count(str(SHIM)) == 1
    assert (SHIM / "geodiag_nnunet_trainers.py").is_file()


def test_env_imports_neither_pandas_nor_torch_nor_matplotlib(tmp_path):
    """`geodiag env` runs inside eval on every shell start: it must stay light. -X importtime lists every module
    the process imported, on stderr, one line each, in a fresh interpreter."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "geodiag.diagnostics.cli", "env"], check=True,
                         capture_output=True, text=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "geodiag.diagnostics.nnunet.environment" in imported and run.stdout.startswith("export ")
    assert not {"pandas", "torch", "matplotlib", "numpy"} & imported


def test_env_with_root_creates_and_exports_the_nnunet_folders(tmp_path):
    lines = _env_lines("--root", str(tmp_path / "root"))
    for name, folder in (("nnUNet_raw", "nnUNet_raw"), ("nnUNet_preprocessed", "nnUNet_preprocessed"),
                         ("nnUNet_results", "nnUNet_results")):
        path = Path(_evaluated(lines, name))
        assert path == tmp_path / "root" / folder and path.is_dir()


def test_monitor_folder_joins_the_trainer_path_when_it_exists(tmp_path, monkeypatch):
    (tmp_path / "losses" / "nnunet_ext").mkdir(parents=True)
    monkeypatch.setattr(environment, "_package_folder", lambda package: tmp_path / package.split(".")[-1])
    assert trainer_folders() == [tmp_path / "losses" / "nnunet_ext"]
    (tmp_path / "diagnostics" / "nnunet_ext").mkdir(parents=True)
    assert trainer_folders() == [tmp_path / "losses" / "nnunet_ext", tmp_path / "diagnostics" / "nnunet_ext"]


def test_doctor_is_ok_when_nnunet_resolves_geodiags_trainer():
    env = {**os.environ, EXT_TRAINER_VAR: ext_trainer_value()}
    diagnosis = diagnose(env=env)
    assert diagnosis.ok, diagnosis.problems
    assert Path(diagnosis.facts["resolved trainer file"]).resolve() == Path(trainer_module.__file__).resolve()
    assert diagnosis.facts["resolved warmup_epochs"] == "20"
    production = preset_kwargs("production")
    assert diagnosis.facts["resolved stabilizer"] == production["stabilizer"]
    assert diagnosis.facts["resolved eps"] == f"{production['eps']:g}"
    from geodiag.diagnostics.instruments import kernels
    assert diagnosis.facts["CPU kernels"].startswith("compiled" if kernels.compiled else "not built")


def test_doctor_names_a_stale_copy_that_shadows_ours(tmp_path, monkeypatch, capsys):
    """The seed's drift: an older nnUNetTrainerGeometric (warm-up 5, V2.4) found before geodiag's."""
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "old_geometric_trainer.py").write_text(textwrap.dedent("""
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        class nnUNetTrainerGeometric(nnUNetTrainer):
            warmup_epochs = 5
            geometric_preset = "v2.4"
    """))
    monkeypatch.setenv(EXT_TRAINER_VAR, os.pathsep.join([str(stale), ext_trainer_value()]))
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "a stale copy shadows geodiag's nnUNetTrainerGeometric" in out
    assert str(stale / "old_geometric_trainer.py") in out
    assert "warmup_epochs 5 (geodiag: 20)" in out
    assert f"eps 0.01 (geodiag: {preset_kwargs('production')['eps']:g})" in out


def test_doctor_reports_an_unset_trainer_path(monkeypatch, capsys):
    monkeypatch.delenv(EXT_TRAINER_VAR, raising=False)
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "nnUNet_extTrainer is unset" in out and "would fail" in out
