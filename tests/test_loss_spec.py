"""Loading a user's loss from the SPEC they typed: every accepted form, and a one-line error for each bad one."""
import os

import pytest
import torch

from geodiag.diagnostics.instruments.errors import GeodiagError
from geodiag.diagnostics.nonfinite.loss_spec import load_loss

from seed_style_loss import GeometricShapeLoss

LOSS_FILE = os.path.join(os.path.dirname(__file__), "seed_style_loss.py")

ONE_ARGUMENT_LOSSES = '''import torch


def mean_foreground(pred):
    return pred[:, 1].mean()


class FlatnessPenalty:
    """Called with the prediction only, as in the researcher's training loop."""

    def __call__(self, pred):
        return (pred[:, 1, 1:] - pred[:, 1, :-1]).abs().mean()


class NeedsWeight(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, pred, target):
        return self.weight * pred.mean()


def broken_factory():
    raise RuntimeError("config file not found")


THRESHOLD = 0.5
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_losses.py"
    path.write_text(ONE_ARGUMENT_LOSSES)
    return path


def logits():
    return torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["loss_v23", "GeometricShapeLoss"])
def test_file_spec_builds_factories_and_classes(name):
    loss = load_loss(f"{LOSS_FILE}:{name}")
    # the file is imported as its own module, so its class is not the one imported by this test
    assert type(loss.fn).__name__ == "GeometricShapeLoss" and type(loss.fn) is not GeometricShapeLoss
    assert loss.takes_target and loss.fn.eps == 1e-4


def test_module_spec_and_the_two_named_versions(monkeypatch):
    monkeypatch.chdir(os.path.dirname(LOSS_FILE))
    v24 = load_loss("seed_style_loss:loss_v24")
    assert v24.fn.eps == 1e-2
    x = torch.zeros(1, 2, 32, 32)
    x[:, 1, 8:24, 8:24] = 8.0
    value = v24(x, None)
    assert value.shape == () and torch.isfinite(value)


def test_a_loss_taking_only_the_prediction_is_called_without_the_target(user_file):
    x = logits()
    function = load_loss(f"{user_file}:mean_foreground")
    assert not function.takes_target
    assert torch.equal(function(x, torch.zeros(2, 1, 16, 16)), torch.softmax(x, 1)[:, 1].mean())
    instance = load_loss(f"{user_file}:FlatnessPenalty")  # a class: built, then its __call__(pred) is used
    assert not instance.takes_target
    p = torch.softmax(x, 1)
    assert torch.equal(instance(x, None), (p[:, 1, 1:] - p[:, 1, :-1]).abs().mean())


def test_logits_input_passes_the_logits_unchanged(user_file):
    x = logits()
    loss = load_loss(f"{user_file}:mean_foreground", input_kind="logits")
    assert torch.equal(loss(x, None), x[:, 1].mean())
    with pytest.raises(GeodiagError, match="probabilities, logits"):
        load_loss(f"{user_file}:mean_foreground", input_kind="softmax")


def test_probabilities_under_autocast_are_what_torch_softmax_returns_there(user_file):
    received = []
    loss = load_loss(f"{user_file}:mean_foreground")
    loss.fn = lambda pred: received.append(pred) or pred.float().mean()
    x = logits().to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss(x, None)
        expected = torch.softmax(x, 1)
    assert received[0].dtype == expected.dtype and torch.equal(received[0], expected)


@pytest.mark.parametrize("spec,reason", [
    ("{dir}/missing.py:loss", "no such file"),
    ("{dir}/bad_syntax.py:loss", "syntax error in .*bad_syntax.py line 3"),
    ("{dir}/my_losses.py:not_there", "has no 'not_there'"),
    ("{dir}/my_losses.py:THRESHOLD", "float is not callable"),
    ("{dir}/my_losses.py:broken_factory", "the factory raised RuntimeError: config file not found"),
    ("{dir}/my_losses.py:NeedsWeight", "the factory raised TypeError"),
    ("no_such_package_xyz.losses:loss", "no module named 'no_such_package_xyz'"),
    ("my_losses.py", "expected package.module:NAME or path/to/file.py:NAME"),
])
def test_bad_specs_are_one_line_errors_naming_spec_and_reason(user_file, spec, reason):
    (user_file.parent / "bad_syntax.py").write_text("import torch\n\ndef loss(pred:\n    return pred\n")
    spec = spec.format(dir=user_file.parent)
    with pytest.raises(GeodiagError) as error:
        load_loss(spec)
    message = str(error.value)
    assert "\n" not in message and repr(spec) in message
    assert pytest.importorskip("re").search(reason, message), message


def test_a_loss_file_imports_its_sibling_modules(tmp_path):
    (tmp_path / "shape_terms_helper.py").write_text("def foreground(pred):\n    return pred[:, 1]\n")
    (tmp_path / "train_loss.py").write_text("from shape_terms_helper import foreground\n\n\n"
                                            "def loss(pred, target):\n    return foreground(pred).mean()\n")
    x = logits()
    assert torch.equal(load_loss(f"{tmp_path / 'train_loss.py'}:loss")(x, None), torch.softmax(x, 1)[:, 1].mean())
