"""Stock nnUNetTrainers (nnU-Net's own train_step) with an injected fault from epoch 1 on, which geodiag watch must
locate: +Inf written into one convolution's output, a collapsing CPU GradScaler, a NaN written into a weight.
Used by tests/test_watch.py through nnUNet_extTrainer."""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

FAULTY_CONV = "encoder.stages.1.0.convs.0.conv"


class nnUNetTrainerInfConv(nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1

    def initialize(self):
        super().initialize()
        self.network.get_submodule(FAULTY_CONV).register_forward_hook(self._inject_inf)

    def _inject_inf(self, module, inputs, output):
        if module.training and self.current_epoch >= 1:
            corner = torch.zeros_like(output, dtype=torch.bool)
            corner[:, 0, 0, 0] = True
            return output.masked_fill(corner, float("inf"))
        return None

    def perform_actual_validation(self, save_probabilities=False):
        pass


class nnUNetTrainerScalerCollapse(nnUNetTrainer):
    """nnU-Net's own train_step with a GradScaler injected on the CPU (init scale 4), and a loss that turns NaN
    from epoch 1 on: the scale halves per skipped step, 4 -> 2 -> 1 -> 0.5, below the floor 1."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 3
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1

    def initialize(self):
        super().initialize()
        self.grad_scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        dice_ce = self.loss
        self.loss = lambda output, target: dice_ce(output, target) * (
            torch.tensor(float("nan")) if self.current_epoch >= 1 else 1.0)

    def perform_actual_validation(self, save_probabilities=False):
        pass


class nnUNetTrainerNanWeight(nnUNetTrainer):
    """A NaN written into the first weight at the start of epoch 1 (as a bad resume or a buggy callback would)."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if self.current_epoch == 1:
            with torch.no_grad():
                next(self.network.parameters()).view(-1)[0] = float("nan")

    def perform_actual_validation(self, save_probabilities=False):
        pass
