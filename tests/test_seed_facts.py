"""The seed's facts, held once in ``geodiag.reports.seed``, against what else states them independently: the loss
presets that replay its versions, the Sobel kernel's gain measured in numpy, and the replica of its trainer and
loss (written as the seed's author wrote them); and no renderer or study module writes one of them again."""
from __future__ import annotations

import ast
import importlib.util
import io
import re
import tokenize
from pathlib import Path

import numpy as np
import pytest

from geodiag.losses.presets import preset_kwargs
from geodiag.reports import seed
from sobel_reference import sobel_squared_magnitude

ROOT = Path(__file__).resolve().parents[1]
REPLICA = ROOT / "diagnostics" / "study" / "seed_replica" / "nnUNetTrainerSeedReplica.py"


@pytest.mark.parametrize("version", seed.VERSIONS, ids=lambda v: v.name)
def test_each_version_is_the_preset_that_replays_it(version):
    preset = preset_kwargs(version.name.lower())
    assert (preset["stabilizer"], preset["eps"]) == version.setting
    assert preset["sobel"] == "seed"
    assert seed.version_of(version.setting) is version
    assert seed.version_of(("shifted", version.eps)) is None


def test_the_units_factor_is_the_raw_sobel_gain_squared():
    """numpy, fp64: inside the image the raw kernel's s over the normalised one is the gain squared, on any image."""
    image = np.random.default_rng(0).random((32, 32))
    raw = sobel_squared_magnitude(image, raw=True, padding="edge")[1:-1, 1:-1]
    normalised = sobel_squared_magnitude(image, raw=False, padding="edge")[1:-1, 1:-1]
    np.testing.assert_allclose(raw / normalised, seed.UNITS_FACTOR, rtol=1e-12)
    assert seed.SOBEL_GAIN ** 2 == seed.UNITS_FACTOR


def test_the_shares_at_the_switch_on_are_stated_for_each_versions_eps():
    assert list(seed.BELOW_AT_SWITCH_ON) == [version.eps for version in seed.VERSIONS]


@pytest.fixture(scope="module")
def replica():
    spec = importlib.util.spec_from_file_location("seed_replica_for_facts", REPLICA)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_replica_replays_the_versions_warmup_batch_and_samples(replica):
    assert replica.nnUNetTrainerSeedReplicaV23.geometric_eps == seed.V23.eps == replica.loss_v23().eps
    assert replica.nnUNetTrainerSeedReplicaV24.geometric_eps == seed.V24.eps == replica.loss_v24().eps
    assert replica.nnUNetTrainerSeedReplica.warmup_epochs == seed.WARMUP
    assert replica.nnUNetTrainerSeedReplica.max_batch_size == seed.BATCH_SIZE
    assert replica.nnUNetTrainerSeedReplica.geometric_samples == seed.LOSS_SAMPLES


def test_the_replica_clips_at_the_seeds_norm():
    calls = [node for node in ast.walk(ast.parse(REPLICA.read_text())) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr == "clip_grad_norm_"]
    assert [ast.literal_eval(call.args[1]) for call in calls] == [seed.CLIP_NORM]


# ------------------------------------------------------------------------------------------ stated once
# What only the seed module may write in code (docstrings and comments apart): its version names, its shares, its
# units factor and the clamps it gives in normalised units; and, in the renderers, a run name's fragment (run kinds
# are the records' fields).
PASTED = re.compile(r"V2\.[34]\b|28\.3%|(?<![\d.])0\.3%|1/64\b|\b1\.6e-[46]\b|\b64x\b")
RUN_NAME_FRAGMENT = re.compile(r"Replica|Production|(?<![.\w])V2[34]\b")
CODE = sorted(p for folder in ("reports", "diagnostics/study", "diagnostics/cli") for p in (ROOT / folder).glob("*.py")
              if p.name != "seed.py")


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal of a module that is not a docstring."""
    source = path.read_text()
    docstrings = {node.body[0].lineno for node in ast.walk(ast.parse(source))
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and ast.get_docstring(node, clean=False)}
    return [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.STRING and tok.start[0] not in docstrings]


@pytest.mark.parametrize("path", CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_writes_a_seed_fact_or_reads_a_run_name(path):
    pasted = [(line, m.group(0)) for line, text in _code_strings(path) for m in PASTED.finditer(text)]
    assert pasted == []
    if path.parent.name == "reports":
        assert [(line, text) for line, text in _code_strings(path) if RUN_NAME_FRAGMENT.search(text)] == []


def test_the_check_finds_a_pasted_fact():
    assert PASTED.search('f"the seed\'s 28.3% below"') and PASTED.search('"(the seed\'s V2.4)"')
    assert RUN_NAME_FRAGMENT.search('"Replica" in name')
