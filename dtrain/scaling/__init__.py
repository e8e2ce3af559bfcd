"""Scaling studies: a first-principles projection of a training step to GPU clusters, hardware presets,
validation against published runs, and sweeps that measure scaling on the machine at hand.

Import direction: this package sits beside the CLI and imports only ``dtrain.config`` and its own
modules at import time; the projection never touches torch.distributed or the strategies. Only the
study runner launches training runs (as subprocesses) and only the calibration times torch kernels.
"""
