"""Untrusted checkpoints cannot run code: pickle globals and the class names in their plans are allowlisted."""
from __future__ import annotations

import os
import pathlib
import pydoc

import pytest
import torch

from checkpoint_faults import write_modified
from geodiag.diagnostics.nnunet.checkpoint import build_network, load_checkpoint
from geodiag.diagnostics.cli import main
from geodiag.diagnostics.cli.options import flag
from geodiag.diagnostics.instruments.errors import ArgumentError


class _TouchWithOsSystem:
    """Unpickling this runs ``os.system('touch MARKER')``."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _TouchWithPathlib:
    """Unpickling this runs ``pathlib.Path(MARKER).touch()``, without any os/subprocess global."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _malicious_checkpoint(stock_run, tmp_path, payload_class, legacy_format=False):
    """A real nnU-Net checkpoint with one extra entry whose unpickling creates ``marker``."""
    marker = tmp_path / "created_by_unpickling"
    data = torch.load(stock_run.final_checkpoint, map_location="cpu", weights_only=False)
    data["payload"] = payload_class(marker)
    path = tmp_path / "malicious.pth"
    torch.save(data, path, _use_new_zipfile_serialization=not legacy_format)
    return path, marker


PAYLOADS = [(_TouchWithOsSystem, False, "posix.system"), (_TouchWithOsSystem, True, "posix.system"),
            (_TouchWithPathlib, False, "builtins.getattr")]
PAYLOAD_IDS = ["os.system", "os.system-legacy-format", "pathlib-touch"]


@pytest.mark.parametrize("payload,legacy,unsafe_global", PAYLOADS, ids=PAYLOAD_IDS)
def test_the_payload_really_creates_its_file_under_full_pickle(stock_run, tmp_path, payload, legacy, unsafe_global):
    """The malicious files below are live: full pickle (what --trust-checkpoint does) runs them."""
    path, marker = _malicious_checkpoint(stock_run, tmp_path, payload, legacy)
    torch.load(path, map_location="cpu", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("payload,legacy,unsafe_global", PAYLOADS, ids=PAYLOAD_IDS)
def test_malicious_checkpoint_is_refused_naming_the_global_and_never_runs(stock_run, tmp_path, capsys, payload,
                                                                          legacy, unsafe_global):
    path, marker = _malicious_checkpoint(stock_run, tmp_path, payload, legacy)
    with pytest.raises(ArgumentError, match=r"pass trust only") as error:
        load_checkpoint(path)
    assert unsafe_global in str(error.value) and "pass --trust-checkpoint only" in error.value.spelled(flag)

    code = main(["analyze-checkpoint", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and unsafe_global in err[0] and "--trust-checkpoint" in err[0]
    assert not marker.exists()


def test_real_nnunet_checkpoints_load_without_trust(geometric_run, stock_run):
    paths = [stock_run.final_checkpoint, geometric_run.final_checkpoint, *geometric_run.checkpoints.values()]
    for path in paths:
        checkpoint = load_checkpoint(path)
        assert checkpoint.data["network_weights"]
    assert isinstance(build_network(load_checkpoint(stock_run.final_checkpoint)), torch.nn.Module)


def test_trusting_a_checkpoint_warns_that_it_can_run_code(stock_run):
    with pytest.warns(UserWarning, match="arbitrary code"):
        load_checkpoint(stock_run.final_checkpoint, trust=True)


def _with_class_names(data: dict, network: str | None = None, **layers: str) -> None:
    architecture = data["init_args"]["plans"]["configurations"][data["init_args"]["configuration"]]
    # The 2d_tiny configuration inherits from 2d and gives the whole architecture dict.
    architecture = architecture["architecture"]
    if network is not None:
        architecture["network_class_name"] = network
    architecture["arch_kwargs"].update(layers)


@pytest.mark.parametrize("names", [
    {"network": "os.system"},
    {"network": "builtins.eval"},
    # pydoc.locate follows attributes: this passes a plain prefix check and is torch.hub.load, which runs a
    # hubconf.py from any folder the (attacker-written) plans name.
    {"network": "dynamic_network_architectures.architectures.unet.torch.hub.load"},
    {"network": "dynamic_network_architectures.architectures.unet.PlainConvUNet.__init__"},
    {"nonlin": "builtins.eval"},
    {"conv_op": "torch.nn.modules.conv.torch.hub.load"},
    {"norm_op": "torch.nn.functional.dropout"},
], ids=["os.system", "builtins.eval", "torch.hub.load-behind-prefix", "private-attribute", "nonlin-eval",
        "conv-op-behind-prefix", "layer-not-a-class"])
def test_plans_naming_a_non_allowlisted_class_are_refused_before_pydoc_locate(stock_run, tmp_path, monkeypatch,
                                                                              names):
    path = write_modified(stock_run.final_checkpoint, tmp_path / "crafted.pth",
                          lambda data: _with_class_names(data, **names))
    checkpoint = load_checkpoint(path)

    def locate(*args, **kwargs):
        raise AssertionError(f"pydoc.locate called with {args}")

    monkeypatch.setattr(pydoc, "locate", locate)
    with pytest.raises(ArgumentError, match="refusing to build .*use trust to override") as error:
        build_network(checkpoint)
    assert "use --trust-checkpoint to override" in error.value.spelled(flag)


@pytest.mark.parametrize("key,value,role", [
    ("image_reader_writer", "np", "image reader/writer"),
    ("label_manager", "torch", "label manager"),
])
def test_plans_naming_a_foreign_object_for_an_nnunet_lookup_are_refused(stock_run, tmp_path, key, value, role):
    """nnU-Net finds these by getattr on its own modules; a crafted name can reach what those modules import."""
    path = write_modified(stock_run.final_checkpoint, tmp_path / "crafted.pth",
                          lambda data: data["init_args"]["plans"].__setitem__(key, value))
    with pytest.raises(ArgumentError, match=f"{role}.*use trust to override") as error:
        load_checkpoint(path)
    assert "use --trust-checkpoint to override" in error.value.spelled(flag)
