"""The README's "Using it" walk, run as a user runs it, so that it cannot rot: its shell blocks are taken from
README.md at test time and run in bash, in a fresh folder standing for the repository's root (its .venv, and
my_loss.py standing for the user's own loss), from a shell without nnU-Net's variables. Sizes are made small only
through the variables the blocks themselves read with defaults; the lines the test does not run are the ones the
README puts behind such a variable."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import torch
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]
SECTION = "Using it"
# The walk at a small size: 5 images (nnU-Net's 5-fold split needs 5) of 32^2 (make-dataset's smallest).
SMALL = {"GEODIAG_WALK_IMAGES": "5", "GEODIAG_WALK_SIZE": "32"}
# The README's switch for the lines the walk leaves out unless asked (bench, the reference report).
LONG_SWITCH = "GEODIAG_WALK_LONG"
COMMAND = re.compile(r"^(geodiag|nnUNetv2_\w+)\b")
# What a user's fresh shell does not have: the walk sets nnU-Net's folders and trainer path itself, and nnU-Net's
# planner cannot run with nnUNet_n_proc_DA=0 (the test suite's setting for in-process augmentation).
NOT_IN_A_FRESH_SHELL = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer",
                        "nnUNet_n_proc_DA")


def readme_blocks(section: str = SECTION) -> list[str]:
    """The ``sh`` code blocks of a level-2 section of README.md, in order."""
    tokens = MarkdownIt().parse((ROOT / "README.md").read_text())
    blocks, inside = [], False
    for index, token in enumerate(tokens):
        if token.type == "heading_open" and token.tag == "h2":
            inside = tokens[index + 1].content == section
        elif inside and token.type == "fence" and token.info.strip() == "sh":
            blocks.append(token.content)
    return blocks


def _commands(script: str) -> tuple[list[str], list[str]]:
    """The command lines of ``script`` (geodiag's and nnU-Net's) outside and inside the README's long-ones switch."""
    run, switched, inside = [], [], False
    for line in (line.strip() for line in script.splitlines()):
        if line.startswith("if ") and LONG_SWITCH in line:
            inside = True
        elif line == "fi":
            inside = False
        elif COMMAND.match(line):
            (switched if inside else run).append(line)
    return run, switched


def _walk_env() -> dict[str, str]:
    """A fresh shell's environment with the small sizes; on a machine with CUDA, the README's GPU setting."""
    env = {key: value for key, value in os.environ.items()
           if key not in NOT_IN_A_FRESH_SHELL and not key.startswith("GEODIAG_WALK_")}
    env.update(SMALL)
    if torch.cuda.is_available():
        env["GEODIAG_WALK_DEVICE"] = "cuda"
    return env


@pytest.fixture(scope="module")
def walk(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Both blocks run as one bash script (``-e``: the first failing command ends it) in a fresh folder."""
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").is_file():
        pytest.skip("the walk starts with `. .venv/bin/activate`: run the tests from a virtual environment")
    folder = tmp_path_factory.mktemp("walk")
    (folder / ".venv").symlink_to(venv, target_is_directory=True)
    shutil.copy(ROOT / "tests" / "seed_style_loss.py", folder / "my_loss.py")
    script = "\n".join(readme_blocks())
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-x", "-c", script], cwd=folder, env=_walk_env(),
                          capture_output=True, text=True, timeout=1800)
    return folder, proc


def test_the_section_holds_the_walk_and_the_own_loss_block():
    blocks = readme_blocks()
    assert len(blocks) == 2
    assert blocks[0].startswith(". .venv/bin/activate\n") and "nnUNetv2_train" in blocks[0]
    assert "--loss my_loss.py:" in blocks[1]


def test_the_walk_is_made_small_only_through_variables_the_readme_reads():
    script = "\n".join(readme_blocks())
    for name in [*SMALL, "GEODIAG_WALK_DEVICE"]:
        assert re.search(r"\$\{" + name + r":-[^}]+\}", script), f"the README reads no ${{{name}:-default}}"


def test_the_walk_leaves_out_only_what_the_readme_switches_off(walk):
    """Every command outside the switch ran, in order (bash's trace); the switched ones are off by the README's
    own default, which the test keeps."""
    folder, proc = walk
    script = "\n".join(readme_blocks())
    run, switched = _commands(script)
    traced = [line[2:] for line in proc.stderr.splitlines() if line.startswith("+ ") and COMMAND.match(line[2:])]
    assert [line.split()[:2] for line in traced] == [line.split()[:2] for line in run]
    assert [line.split()[:2] for line in switched] == [["geodiag", "bench"], ["geodiag", "reference-report"]]
    assert f'"${{{LONG_SWITCH}:-0}}" = 1' in script and LONG_SWITCH not in _walk_env()


def test_the_walk_runs_as_written(walk):
    folder, proc = walk
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    assert "ok: nnUNetv2_train -tr nnUNetTrainerGeometric uses geodiag's trainer" in proc.stdout
    results = folder / "nnunet" / "nnUNet_results" / "Dataset502_Shapes_One"
    assert [p.name for p in results.iterdir()] == ["nnUNetTrainerGeometricQuick__nnUNetPlans__2d"]
    assert (results / "nnUNetTrainerGeometricQuick__nnUNetPlans__2d" / "fold_0" / "checkpoint_final.pth").is_file()


def test_the_walk_writes_what_the_readme_names(walk):
    folder, proc = walk
    assert proc.returncode == 0, proc.stderr[-2000:]
    for analysis in ("analysis", "analysis_mine"):
        summary = json.loads((folder / analysis / "summary.json").read_text())
        assert summary["verdict"] == "healthy", (analysis, summary["verdict"])
    assert "my_loss.py" in json.dumps(json.loads((folder / "analysis_mine" / "summary.json").read_text())["loss"])
    for sweep in ("sweep", "sweep_fold0", "sweep_mine"):
        assert (folder / sweep / "report.md").is_file() and (folder / sweep / "report.html").is_file()
    for junit in ("bounds.xml", "bounds_mine.xml"):
        suite = ElementTree.parse(folder / junit).getroot()
        assert int(suite.get("tests") or suite[0].get("tests")) > 0
