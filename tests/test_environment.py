"""`geodiag env` and `geodiag doctor`: nnU-Net finds geodiag's trainer, and a shadowing stale copy is caught."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import geodiag.losses.nnunet.trainer as trainer_module
from geodiag.losses import preset_kwargs
from geodiag.diagnostics.nnunet import environment
from geodiag.diagnostics.cli import main
from geodiag.diagnostics.nnunet.environment import EXT_TRAINER_VAR, diagnose, ext_trainer_value, trainer_folders

SHIM = Path(trainer_module.__file__).parent.parent / "nnunet_ext"  # losses/nnunet_ext
USER_TRAINERS = Path(__file__).parent / "user_trainers"
STALE_TRAINER = """
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

class nnUNetTrainerGeometric(nnUNetTrainer):
    warmup_epochs = {warmup}
    geometric_preset = "v2.4"
"""


def _stale_folder(tmp_path: Path, warmup: str = "5") -> Path:
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "old_geometric_trainer.py").write_text(STALE_TRAINER.format(warmup=warmup))
    return stale


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
    stale = _stale_folder(tmp_path)
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


# ---------------------------------------------------------------------------------------------- reading the source
# nnU-Net's own lookup, run as nnUNetv2_train runs it, the independent reference: the class each name gets, its file
# (recorded at import: nnU-Net drops the modules of nnUNet_extTrainer folders afterwards) and class-level values.
_NNUNET_LOOKUP = r"""
import importlib, inspect, json, sys
files, _import = {}, importlib.import_module
def recording(name, package=None):
    module = _import(name, package)
    files[module.__name__] = getattr(module, "__file__", None)
    return module
importlib.import_module = recording
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
keys, found = sys.argv[1].split(","), {}
for name in sys.argv[2:]:
    cls = recursive_find_trainer_class_by_name(name)
    found[name] = {"module": cls.__module__, "file": files.get(cls.__module__) or inspect.getfile(cls),
                   "settings": {key: getattr(cls, key, None) for key in keys}}
print("LOOKUP " + json.dumps(found))
"""
def test_the_source_reader_finds_the_class_and_settings_nnunets_own_lookup_finds(tmp_path):
    """A stale copy first, a researcher's folder, then geodiag's: nnU-Net's tree (a variant in a subpackage, the base
    class every module imports), the stale copy winning, geodiag's quick trainers (MonitoredQuick's warm-up 2 comes
    from its second base: Python's C3 order, not depth first) and the researcher's subclass of a subclass."""
    from geodiag.diagnostics.nnunet.trainer_source import class_settings, find_trainer, subclasses_nnunet_trainer

    mine = tmp_path / "my_trainers"
    shutil.copytree(USER_TRAINERS, mine)
    ext = os.pathsep.join([str(_stale_folder(tmp_path)), str(mine), ext_trainer_value()])
    names = ["nnUNetTrainer_5epochs", "nnUNetTrainer", "nnUNetTrainerGeometric", "nnUNetTrainerGeometricQuick",
             "nnUNetTrainerGeometricV24Quick", "nnUNetTrainerGeometricMonitoredQuick", "nnUNetTrainerStrongPrior",
             "nnUNetTrainerMyShapePrior"]
    keys = [*environment.CLASS_SETTINGS, "save_every_epoch", "monitor_every"]
    run = subprocess.run([sys.executable, "-c", _NNUNET_LOOKUP, ",".join(keys), *names], capture_output=True,
                         text=True, env={**os.environ, EXT_TRAINER_VAR: ext}, timeout=600)
    line = next((line for line in run.stdout.splitlines() if line.startswith("LOOKUP ")), None)
    assert line is not None, run.stderr[-2000:]
    expected = json.loads(line[len("LOOKUP "):])
    assert Path(expected["nnUNetTrainerGeometric"]["file"]).parent.name == "stale"
    assert expected["nnUNetTrainerGeometricMonitoredQuick"]["settings"]["warmup_epochs"] == 2
    for name in names:
        found = find_trainer(name, ext)
        assert (found.module.name, str(found.module.file)) == (expected[name]["module"], expected[name]["file"])
        assert class_settings(found, keys) == expected[name]["settings"], name
        assert subclasses_nnunet_trainer(found)
    assert find_trainer("nnUNetTrainerNobodyWrote", ext) is None


@pytest.mark.parametrize("source,reason", [
    ("from my_helpers import *\n", "a star import may bind nnUNetTrainerMine"),
    ("try:\n    from my_helpers import nnUNetTrainerMine\nexcept ImportError:\n    nnUNetTrainerMine = None\n",
     "nnUNetTrainerMine may be bound here at run time"),
    ("def __getattr__(name):\n    return None\n", "nnUNetTrainerMine may be bound here at run time"),
], ids=["star-import", "conditional", "module-getattr"])
def test_the_source_reader_says_when_the_source_alone_cannot_say(tmp_path, source, reason):
    from geodiag.diagnostics.nnunet.trainer_source import SourceUnclear, find_trainer

    (tmp_path / "my_module.py").write_text(source)
    with pytest.raises(SourceUnclear, match=reason):
        find_trainer("nnUNetTrainerMine", str(tmp_path))


def test_doctor_imports_no_trainer_module(tmp_path):
    """nnU-Net's own lookup imports every module of every folder it passes (a researcher's included: its code runs)
    and most of nnU-Net with them; doctor reads the same folders' source and imports none of them."""
    mine = tmp_path / "my_trainers"
    mine.mkdir()
    marker = tmp_path / "my module ran"
    (mine / "my_trainers.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    env = {**os.environ, EXT_TRAINER_VAR: os.pathsep.join([str(mine), *map(str, trainer_folders())])}
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "geodiag.diagnostics.cli", "doctor"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert not marker.exists()
    assert not {name for name in imported if name.startswith("nnunetv2")}
    assert "geodiag.losses.nnunet.trainer" not in imported
    assert "trainer lookup             read from the source (no trainer module imported)" in run.stdout


def test_doctor_asks_nnunet_where_the_source_alone_cannot_say(tmp_path, monkeypatch, capsys):
    """A stale copy whose warm-up is computed: nnU-Net's own lookup gives its value, and doctor says why it ran."""
    stale = _stale_folder(tmp_path, warmup='int("5")')
    monkeypatch.setenv(EXT_TRAINER_VAR, os.pathsep.join([str(stale), ext_trainer_value()]))
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert ("nnU-Net's own, by importing (the source alone cannot say: "
            f"{stale / 'old_geometric_trainer.py'}:5: nnUNetTrainerGeometric.warmup_epochs is not a literal "
            "(int('5')))") in out
    assert "a stale copy shadows geodiag's nnUNetTrainerGeometric" in out and "warmup_epochs 5 (geodiag: 20)" in out
