"""The trainer side of geodiag's losses: the nnU-Net trainers, the step guard any trainer instance can wear, the one
finiteness scan of its state, and the undoable patches they install (imported on demand: ``geodiag.losses`` itself
never needs nnunetv2)."""
