"""The user's line: automatic taps, bound overrides, NaN provenance and the record of a raising call all name a call
by the same frame, the innermost that is neither torch's, nnU-Net's nor geodiag's machinery.

The calls come from a researcher's file (written here) through torch's Python code (``F.normalize``,
``clip_grad_norm_``), through a geodiag wrapper too (``clip_grad_norm_`` as the step guard captures it under
``geodiag watch``), and through nnU-Net's network code, which is named only when geodiag itself ran it. The seed
replica, user code shipped inside geodiag's tree, is a user's to every consumer. Expected lines are found in the
files' text; overflow values are chosen by arithmetic (1e20 squared is above fp32's 3.4e38; nine products of 1e38
sum above it).
"""
import importlib.util
import inspect
import math
import os

import pytest
import torch
from torch import nn

from geodiag.diagnostics.instruments.errors import GeodiagError
from geodiag.diagnostics.nnunet.cases import predict_logits
from geodiag.diagnostics.nonfinite.autotaps import AutoTaps
from geodiag.diagnostics.nonfinite.loss_spec import load_loss
from geodiag.diagnostics.nonfinite.override import BoundOverride
from geodiag.diagnostics.nonfinite.provenance import NonFiniteProvenance
from geodiag.diagnostics.nonfinite.sites import exception_site
from geodiag.diagnostics.study.replica import FILE as SEED_REPLICA
from geodiag.diagnostics.tools.own_loss import LossRaised, raising_as_finding
from geodiag.losses.nnunet.guard import StepGuard

USER_CODE = '''"""A researcher's helpers: unit directions for a shape loss, the network call, a train_step's clip."""
import torch
import torch.nn.functional as F


def directions(x):
    return F.normalize(x, dim=1)


def clip(parameters, max_norm, strict=False):
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm, error_if_nonfinite=strict)


def predict(network, x):
    return network(x)
'''
NORMALIZE, CLIP, PREDICT = "F.normalize(x, dim=1)", "clip_grad_norm_(", "return network(x)"


def line_of(path, snippet: str) -> int:
    lines = [i for i, text in enumerate(open(path).read().splitlines(), start=1) if snippet in text]
    assert len(lines) == 1, (snippet, lines)
    return lines[0]


class UserFile:
    def __init__(self, folder):
        self.path = folder / "my_helpers.py"
        self.path.write_text(USER_CODE)
        spec = importlib.util.spec_from_file_location("my_helpers", self.path)
        self.module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.module)

    def site(self, snippet: str) -> str:
        return f"{self.path}:{line_of(self.path, snippet)}"


@pytest.fixture
def user(tmp_path) -> UserFile:
    return UserFile(tmp_path)


@pytest.fixture(params=["torch", "geodiag wrapper"])
def clip_path(request):
    """torch.nn.utils.clip_grad_norm_ as torch defines it, or wrapped by geodiag (the step guard's capture, in
    place under geodiag watch): between the user's line and the ops, torch's frames only, or geodiag's too."""
    capture = StepGuard(trainer=None).start_capture() if request.param == "geodiag wrapper" else None
    wrapper = torch.nn.utils.clip_grad_norm_.__module__ == "geodiag.losses.nnunet.guard"
    assert wrapper == (capture is not None)
    yield request.param
    if capture is not None:
        capture.remove()


def huge_gradient() -> list[nn.Parameter]:
    parameter = nn.Parameter(torch.zeros(4))
    parameter.grad = torch.full((4,), 1e20)  # finite; its squares are not: the norm overflows
    return [parameter]


def test_taps_name_the_users_line_of_the_clip(user, clip_path):
    taps = AutoTaps()
    taps.run(user.module.clip, huge_gradient(), 12.0)
    found = {(row["site"], row["op"]) for row in taps.result().sites}
    assert {(user.site(CLIP), "norm"), (user.site(CLIP), "div"), (user.site(CLIP), "clamp")} <= found
    assert {site for site, _ in found} == {user.site(CLIP)}


def test_an_override_lists_the_users_line_of_the_clip(user, clip_path):
    with pytest.raises(GeodiagError) as error:
        with BoundOverride({"my_helpers.py:1": 1e-2}):
            user.module.clip(huge_gradient(), 12.0)
    assert str(error.value).endswith(f"sites found: {user.site(CLIP)} (clamp without numeric min)")


def test_provenance_names_the_users_line_of_the_overflowing_clip_norm(user, clip_path):
    with NonFiniteProvenance(sync="op") as provenance:
        user.module.clip(huge_gradient(), 12.0)
    report = provenance.report()
    assert report is not None and report.produced and "norm" in report.op
    assert report.source.startswith(f"{user.site(CLIP)} in clip:")


def test_a_raising_clip_is_recorded_at_the_users_line(user, clip_path):
    with pytest.raises(LossRaised) as recorded:
        with raising_as_finding():
            user.module.clip(huge_gradient(), 12.0, strict=True)
    assert recorded.value.site == user.site(CLIP) and "is non-finite" in recorded.value.message


def test_provenance_and_a_raising_call_name_the_users_line_through_torchs_functional_code(user):
    with NonFiniteProvenance(sync="op") as provenance:
        user.module.directions(torch.tensor([[1e20, 1e20, 1.0]]))
    report = provenance.report()
    assert report is not None and report.produced and "norm" in report.op
    assert report.source.startswith(f"{user.site(NORMALIZE)} in directions:")
    with pytest.raises(IndexError) as error:
        user.module.directions(torch.ones(2))                  # no dimension 1 to normalise along
    assert exception_site(error.value) == user.site(NORMALIZE)


def nnunet_conv_block() -> nn.Module:
    """nnU-Net's own conv block (dynamic_network_architectures) whose 3x3 sums of 1e38 overflow."""
    from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU

    block = ConvDropoutNormReLU(nn.Conv2d, 1, 2, 3, 1)
    with torch.no_grad():
        block.conv.weight.fill_(1e38)
    return block


def test_nnunets_code_is_passed_for_the_users_line_and_named_when_geodiag_ran_it(user):
    from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU

    block_file = inspect.getsourcefile(ConvDropoutNormReLU)
    block_line = line_of(block_file, "return self.all_modules(x)")
    image = torch.ones(1, 8, 8)
    with NonFiniteProvenance(sync="op") as provenance:
        user.module.predict(nnunet_conv_block(), image[None])        # the user's code ran nnU-Net's network
    assert provenance.report().source.startswith(f"{user.site(PREDICT)} in predict:")
    with NonFiniteProvenance(sync="op") as provenance:
        predict_logits(nnunet_conv_block(), image, (8, 8))            # geodiag ran it: no user line in between
    assert provenance.report().source.startswith(f"{block_file}:{block_line} in forward:")


def test_the_seed_replica_inside_geodiags_tree_is_a_users_code_to_every_consumer():
    loss = load_loss(f"{SEED_REPLICA}:loss_v23")
    probabilities = torch.zeros(2, 2, 16, 16)
    probabilities[:, 1, 4:12, 4:12] = 1.0                      # area 64, above the replica's cut of 50
    probabilities[:, 0] = 1.0 - probabilities[:, 1]
    taps = AutoTaps()
    assert math.isfinite(float(taps.run(loss.call, probabilities, None)))
    sites = taps.result().sites
    assert {os.path.abspath(row["site"].rsplit(":", 1)[0]) for row in sites} == {str(SEED_REPLICA)}
    assert all(row["nonfinite_forward"] == 0 for row in sites)  # this input is healthy
    overflowing = probabilities.clone()
    overflowing[0, 1, 8, 8] = 1e37                             # its Sobel response squared is above 3.4e38
    with NonFiniteProvenance(sync="op") as provenance:
        loss.call(overflowing, None)
    line = line_of(SEED_REPLICA, "grad_mag_squared = grad_x ** 2 + grad_y ** 2")
    assert provenance.report().source.startswith(f"{SEED_REPLICA}:{line} in compactness_loss:")
    with pytest.raises(RuntimeError, match="c10::Half") as error:
        with torch.autocast("cpu", dtype=torch.float16):      # its clamp bound 1e6 does not fit fp16
            loss.call(probabilities, None)
    assert exception_site(error.value).endswith(
        f"{SEED_REPLICA.name}:{line_of(SEED_REPLICA, 'perimeter = torch.clamp(grad_mag.sum(dim=(1, 2, 3)), 10.0')}")
