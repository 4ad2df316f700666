"""check-bounds on a foreign loss: every case runs, a case the loss cannot take fails (or is skipped) with its
reason, the run exits 1 and never aborts. The loss is written as a researcher writes a 2D-only one."""
import pytest

from geodiag.diagnostics.cli import main
from geodiag.diagnostics.tools import bounds

TWO_D_LOSS = '''import torch
import torch.nn.functional as F

SOBEL = torch.tensor([[-1., 0., 1.], [-2., 0., 2.], [-1., 0., 1.]])


def perimeter_loss(pred):
    p = pred[:, 1:2]
    gx = F.conv2d(p, SOBEL.view(1, 1, 3, 3).to(p.dtype), padding=1)
    gy = F.conv2d(p, SOBEL.t().reshape(1, 1, 3, 3).to(p.dtype), padding=1)
    perimeter = torch.sqrt(gx ** 2 + gy ** 2).sum()
    return perimeter / p.sum().clamp(min=1.0)
'''
CASES_2D = ["tiny_disk", "uniform_half", "saturated", "noise"]


@pytest.fixture
def loss_file(tmp_path):
    path = tmp_path / "my_perimeter.py"
    path.write_text(TWO_D_LOSS)
    return path


def _run(capsys, *args):
    code = main(["check-bounds", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_every_case_runs_the_3d_case_fails_with_its_line_and_the_run_exits_1(capsys, loss_file):
    cases = ",".join(CASES_2D + ["ball_3d"])
    code, out, err = _run(capsys, "--loss", f"{loss_file}:perimeter_loss", "--cases", cases, "--precisions", "fp32")
    assert code == 1 and not err
    rows = {line.split()[0]: line for line in out.splitlines()[2:] if line.split() and line.split()[0] in bounds.CASES}
    assert set(rows) == set(CASES_2D) | {"ball_3d"}
    # sqrt(0) where the map is exactly flat (p = 0.5 everywhere; saturated logits): 0 * inf = NaN in backward
    for name in ("uniform_half", "saturated"):
        assert rows[name].split()[-1] == "FAIL" and rows[name].split()[6].split("/")[1] != "0"
    assert rows["tiny_disk"].split()[-1] == "ok*"
    regressions = [line for line in out.splitlines() if line.startswith("REGRESSION") and "grad_nonfinite" in line]
    assert {line.split()[1] for line in regressions} == {"uniform_half", "saturated"}
    raised = [line for line in out.splitlines() if line.startswith("RAISED")]
    assert len(raised) == 1 and raised[0].startswith("RAISED ball_3d /")
    conv_line = TWO_D_LOSS.splitlines().index(
        "    gx = F.conv2d(p, SOBEL.view(1, 1, 3, 3).to(p.dtype), padding=1)") + 1
    assert "RuntimeError" in raised[0] and f"my_perimeter.py:{conv_line}" in raised[0]


def test_dims_2_lists_the_3d_case_as_skipped_with_its_reason(capsys, loss_file, tmp_path):
    junit = tmp_path / "junit.xml"
    code, out, _ = _run(capsys, "--loss", f"{loss_file}:perimeter_loss", "--cases", "tiny_disk,ball_3d",
                        "--precisions", "fp32,bf16", "--dims", "2", "--junit", junit)
    assert code == 1
    skipped = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) == 2 and all("ball_3d" in line and "3D case; --dims 2" in line for line in skipped)
    assert "1 passed, 1 failed, 2 skipped" in out
    assert junit.read_text().count("<skipped ") == 2


def test_a_loss_taking_logits_gets_the_logits_cast_as_autocast_leaves_them(capsys, tmp_path):
    (tmp_path / "logit_loss.py").write_text(
        "seen = []\n\n\ndef margin(logits, target):\n    seen.append(logits.dtype)\n"
        "    return (logits[:, 1] - logits[:, 0]).abs().mean()\n")
    code, out, _ = _run(capsys, "--loss", f"{tmp_path / 'logit_loss.py'}:margin", "--loss-input", "logits",
                        "--cases", "tiny_disk", "--precisions", "fp32,bf16")
    assert code == 0, out
    import sys
    module = next(m for name, m in sys.modules.items() if name.startswith("geodiag_user_loss_logit_loss"))
    import torch
    assert module.seen == [torch.float32, torch.bfloat16]


def test_bad_dims_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["check-bounds", "--dims", "4"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "--dims" in err
