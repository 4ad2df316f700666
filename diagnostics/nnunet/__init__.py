"""nnU-Net integration: checkpoint loading, cases, environment, the trainer wrapper and watch; may import nnunetv2."""
