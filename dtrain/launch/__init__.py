"""Launchers: render a torchrun command, an sbatch script or Kubernetes manifests from the training config,
and ``dtrain launch run``, the torchrun wrapper that hands the workers' exit code to the scheduler.

Imports only ``dtrain.config``, ``dtrain.exit_codes`` and its own modules (DESIGN.md).
"""
