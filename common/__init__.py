"""Shared toolkit for the week-3 lessons: devices, memory, measurement, models, reports, plots, CLI."""
import logging

# Importing transformers' pipelines imports torchao when it is installed, and torchao logs a warning for every
# CUDA-only kernel library a CPU machine cannot load; torch logs another per enum torchao registers. Neither says
# anything about the lesson, so a lesson imports `common` before transformers.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
