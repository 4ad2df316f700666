"""`geodiag replay STEP_FOLDER`: re-run a step saved by `geodiag watch` under provenance, in its own setting and at
loss scale 1 in fp32 and fp64, on this machine's CPU or GPU. Exit 3 when the non-finite value is reproduced (or
already in the step's batch), 0 when it is not, 1 when the step's own code raised."""
from __future__ import annotations

import argparse

HELP = "re-run a step saved by geodiag watch (geodiag_watch/step_N/) and classify its non-finite value"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("step", metavar="STEP_FOLDER", help="a geodiag_watch/step_<iteration>/ folder")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    import torch

    from geodiag.reports import schema

    from ..instruments.devices import resolve_device
    from ..nnunet.saved_step import build_trainer, load_step
    from ..nonfinite.replay import replay_train_step

    step = load_step(args.step)
    device = torch.device(resolve_device(args.device))
    trainer = build_trainer(step, device)
    result = replay_train_step(trainer, trainer.train_step, step.batch, rng_state=step.rng_state,
                               scaler_state=step.scaler_state)
    path = schema.write_json(step.folder / f"replay_{device.type}.json", result)
    for run in result["runs"]:
        where = f"{run['phase']} {run['op']} at {run['site']}" if run["op"] else "no op flagged"
        print(f"{run['setting']:<26} loss {run['loss']:.6g}  non-finite {run['nonfinite']}  {where}  "
              f"non-finite parameter gradients {run['nonfinite_parameter_gradients']}")
    print(f"classification: {result['classification']} — {result['explanation']}")
    print(f"written {path}")
    if result["classification"] == schema.REPLAY_FAILED:
        return 1
    return 0 if result["classification"] == schema.REPLAY_NOT_REPRODUCED else 3
