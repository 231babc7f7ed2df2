"""The options every lesson shares, and the start/stop plumbing: banner, seed, threads, report, exit codes."""
from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch

from common.device import DEVICE_CHOICES, describe_environment, pick_device
from common.errors import UserError
from common import models
from common.calibration import calibrate
from common.meter import PerformanceMeter
from common.models import SOURCES
from common.report import Report

T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad options as our one-line UserError instead of its own usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see --help)")


def base_parser(description: str) -> argparse.ArgumentParser:
    """A parser with --device, --source, --quick, --output-dir, --threads and --seed."""
    parser = _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
    parser.add_argument("--source", default="auto", choices=SOURCES,
                        help="hub: Hugging Face checkpoints; bundled: the pip-installed models and twins; "
                             "auto: hub when reachable or cached, else bundled")
    parser.add_argument("--quick", action="store_true", help="a fast, smaller run (what the tests use)")
    parser.add_argument("--output-dir", type=Path, default=None, help="where charts and reports go "
                        "(default: outputs/<script name>/)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed for torch, numpy and random")
    return parser


@dataclass
class Context:
    """What every section needs: parsed options, the device, the output folder and the report."""

    args: argparse.Namespace
    device: torch.device
    out_dir: Path
    report: Report
    _loaded: dict[tuple, models.LoadedModel] = field(default_factory=dict, repr=False)

    @property
    def quick(self) -> bool:
        """True for the fast run."""
        return bool(self.args.quick)

    @property
    def source(self) -> str:
        """auto, hub or bundled."""
        return self.args.source

    def pick(self, full: T, quick: T) -> T:
        """The full-run value, or the --quick one (lessons keep both side by side in a settings dataclass)."""
        return quick if self.quick else full

    def meter(self, device: torch.device | str | None = None, **overrides: Any) -> PerformanceMeter:
        """The lessons' meter on this run's device (or another), with the full or --quick budget."""
        return PerformanceMeter.for_run(self.quick, self.device if device is None else device, **overrides)

    def record(self, info: models.ModelInfo) -> models.ModelInfo:
        """List a model the lesson loaded itself in this run's report (provenance: Hub, bundled or twin)."""
        self.report.add_model(info.to_dict())
        return info

    def load(self, role: str, device: torch.device | str | None = None, **kwargs: Any) -> models.LoadedModel:
        """Load a role once per run (same device and options give the same object) and record it in the report."""
        device = torch.device(self.device if device is None else device)
        key = (role, str(device), repr(sorted(kwargs.items())))
        if key not in self._loaded:
            self._loaded[key] = models.load_model(role, source=self.source, device=device, **kwargs)
            self.record(self._loaded[key].info)
        return self._loaded[key]


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch so sampled text and random twins repeat."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start(script_file: str, args: argparse.Namespace) -> Context:
    """Apply threads and seed, choose the device, print the environment banner, open the report."""
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    device = pick_device(args.device)
    stem = Path(script_file).stem
    out_dir = args.output_dir if args.output_dir is not None else Path(script_file).resolve().parent / "outputs" / stem
    environment = describe_environment(device)
    environment["source"] = args.source
    environment["quick"] = bool(args.quick)
    environment["seed"] = args.seed
    print(f"{stem}  |  device {device}  |  torch {environment['torch']}  transformers {environment['transformers']}"
          f"  bitsandbytes {environment['bitsandbytes'] or 'not installed'}")
    print(f"CPU: {environment['cpu']}  ({environment['physical_cores']} cores / {environment['logical_cores']} threads,"
          f" torch uses {environment['torch_threads']})  RAM {environment['ram_gib']} GiB")
    if environment["gpu"]:
        gpu = environment["gpu"]
        print(f"GPU: {gpu['name']}  {gpu['memory_gib']} GiB  compute capability {gpu['capability']}")
    print(f"model source: {args.source}  |  outputs: {out_dir}")
    report = Report(stem, out_dir, environment)
    report.calibration["start"] = calibrate()
    return Context(args=args, device=device, out_dir=out_dir, report=report)


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Call main and exit with its code; a UserError becomes one line on stderr and exit 2, Ctrl-C exit 130."""
    try:
        code = main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("\ninterrupted: the report written so far is marked partial", file=sys.stderr)
        code = 130
    sys.exit(code)
