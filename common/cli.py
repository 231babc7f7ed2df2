"""The options every lesson shares, and the start/stop plumbing: banner, seed, threads, report, exit codes."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from filelock import FileLock, Timeout
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from common.device import DEVICE_CHOICES, describe_environment, pick_device
from common.errors import OutputClosed, Terminated, UserError
from common import models
from common.calibration import calibrate
from common.memory import MIB, peak_rss_method
from common.meter import Comparison, PerformanceMeter
from common.models import SOURCES
from common.report import Report, show

T = TypeVar("T")
THREADS_PER_CORE_LIMIT = 4  # more torch threads than this per core only thrash (and 100000 crashes the process)
SEED_LIMIT = 2**32 - 1  # numpy's seed range
MIN_FREE_BYTES = 16 * MIB  # one run's charts and reports take a few MiB
LOCK_NAME = ".run.lock"  # held in the output folder for the whole run, so two runs never mix their files
OWNER_NAME = ".run.owner"  # who holds the lock, for the refusal line (a Windows lock file cannot be read meanwhile)


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad options as our one-line UserError instead of its own usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see --help)")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" to an option's help unless the help already says its default in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        return text if "(default:" in text else super()._get_help_string(action)


def int_in_range(low: int, high: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number from low to high, else a one-line error naming the allowed range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be a whole number from {low} to {high}{why}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}{why}, got {value}")
        return value

    return parse


def base_parser(description: str) -> argparse.ArgumentParser:
    """A parser with --device, --source, --quick, --output-dir, --threads and --seed."""
    parser = _Parser(description=description, formatter_class=_DefaultsFormatter)
    parser.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
    parser.add_argument("--source", default="auto", choices=SOURCES,
                        help="hub: Hugging Face checkpoints; bundled: the pip-installed models and twins; "
                             "auto: hub when reachable or cached, else bundled")
    parser.add_argument("--quick", action="store_true", help="a fast, smaller run (what the tests use)")
    parser.add_argument("--output-dir", type=Path, default=None, help="where charts and reports go "
                        "(default: outputs/<script name>/)")
    cores = os.cpu_count() or 1
    parser.add_argument("--threads", default=None, help="torch CPU threads (default: torch's choice)",
                        type=int_in_range(1, THREADS_PER_CORE_LIMIT * cores,
                                          f" ({THREADS_PER_CORE_LIMIT}x this machine's {cores} logical cores)"))
    parser.add_argument("--seed", type=int_in_range(0, SEED_LIMIT), default=0, help="seed for torch, numpy and random")
    return parser


def add_text_options(parser: argparse.ArgumentParser) -> None:
    """Add --text (repeatable) and --text-file, the learner's own sentences; read them with read_user_texts."""
    parser.add_argument("--text", action="append", default=None,
                        help="a sentence of your own (repeat the option for several)")
    parser.add_argument("--text-file", type=Path, default=None, help="a UTF-8 file with one text per line")


def read_user_texts(args: argparse.Namespace) -> list[str] | None:
    """The user's --text and --text-file sentences (blank lines dropped), None when neither was given."""
    if args.text is None and args.text_file is None:
        return None
    given = list(args.text or [])
    if args.text_file is not None:
        path = args.text_file
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise UserError(f"--text-file {path}: no such file") from None
        except OSError as error:
            raise UserError(f"--text-file {path}: cannot read it ({error.strerror or error})") from None
        try:
            given += raw.decode("utf-8-sig").splitlines()
        except UnicodeDecodeError as error:
            raise UserError(f"--text-file {path} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset "
                            f"{error.start}); save it as UTF-8, one text per line") from None
    kept = [text.strip() for text in given if text.strip()]
    if not kept:
        raise UserError("no text to work on: --text/--text-file gave only empty lines; pass at least one sentence")
    return kept


Section = tuple[str, Callable[..., Any]]  # (title, function whose docstring is the why printed under the title)


def add_only_option(parser: argparse.ArgumentParser, sections: dict[str, Section]) -> None:
    """Add --only NAME[,NAME], checked against the lesson's section names before any work starts."""
    def names(text: str) -> list[str]:
        chosen = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in chosen if name not in sections]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(unknown) or '(none given)'}; "
                                             f"choose from {', '.join(sections)}")
        return chosen

    parser.add_argument("--only", type=names, default=list(sections), metavar="SECTION[,SECTION]",
                        help=f"run a subset of: {', '.join(sections)}")


def run_sections(ctx: "Context", sections: dict[str, Section], *args: Any, only: list[str] | None = None,
                 results: dict[str, Any] | None = None, after_each: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run the chosen sections in order as section(ctx, *args), plus the results so far when `results` is given;
    after_each() runs after every section."""
    shared = () if results is None else (results,)  # sections that build on earlier ones read them here
    results = {} if results is None else results
    if only is not None and len(only) < len(sections):
        print(f"--only: running {', '.join(name for name in sections if name in only)}")
    for name, (title, section) in sections.items():
        if only is None or name in only:
            results[name] = ctx.report.run_section(title, section.__doc__ or "", section, ctx, *args, *shared)
            if after_each:
                after_each()
    return results


@dataclass
class Context:
    """What every section needs: parsed options, the device, the output folder and the report."""

    args: argparse.Namespace
    device: torch.device
    out_dir: Path
    report: Report
    output_lock: OutputLock | None = None  # taken in start(), released in close(): no other run writes out_dir
    _loaded: dict[tuple, Any] = field(default_factory=dict, repr=False)

    def close(self) -> None:
        """Release the output folder for the next run (cli.run does it when the lesson returns or stops)."""
        if self.output_lock is not None:
            self.output_lock.close()
            self.output_lock = None

    def finish(self) -> int:
        """Write the final report, then free the output folder; the exit code (1 if a section failed)."""
        try:
            return self.report.finish()
        finally:
            self.close()

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

    def show(self, comparison: Comparison, baseline: str, title: str, **options: Any) -> list[dict[str, Any]]:
        """report.show into this run's report, filed under the running section."""
        return show(comparison, baseline, title, report=self.report, **options)

    def record(self, info: models.ModelInfo) -> models.ModelInfo:
        """List a model the lesson loaded itself in this run's report (provenance: Hub, bundled or twin)."""
        self.report.add_model(info.to_dict())
        return info

    def record_load(self, where: models.Checkpoint, load: Callable[[], T]) -> T:
        """load() a model or a pipeline, timed, and record it in the report as `where`'s."""
        started = time.perf_counter()
        made = load()
        model = made if isinstance(made, torch.nn.Module) else made.model  # a pipeline holds its model
        self.record(where.info(model, time.perf_counter() - started))
        return made

    def build_each(self, what: str, builders: dict[str, Callable[[], Any]], problem: Callable[[str], str | None],
                   check: Callable[[Any], Any] = lambda built: None, where: models.Checkpoint | None = None,
                   labels: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
        """Build each variant that can run here (timed; recorded when `where` is given) with check(built)'s output
        and how long that check took; a variant with a problem, or whose build raises, is skipped with the reason."""
        def one(build: Callable[[], Any]) -> dict[str, Any]:
            started = time.perf_counter()
            model = build()
            built_at = time.perf_counter()
            entry = {"model": model, "prepare_s": built_at - started, "output": check(model)}
            entry["check_s"] = time.perf_counter() - built_at
            if where:
                self.record(where.info(model, entry["prepare_s"], verbose=False))
            return entry

        built = {}
        for key, build in tqdm(builders.items(), desc=f"{what} variants", disable=None, leave=False):
            label = f"{what} {(labels or {}).get(key, key)}"
            if problem(key):
                self.report.skip(label, problem(key))
            elif (entry := self.report.attempt(label, lambda: one(build))) is not None:
                built[key] = entry  # a missing package, a failed export or a missing backend was recorded as a skip
        return built

    def once(self, key: tuple, build: Callable[[], T]) -> T:
        """build() the first time a key is asked for in this run; the same object every later time."""
        if key not in self._loaded:
            self._loaded[key] = build()
        return self._loaded[key]

    def forget_loaded(self) -> None:
        """Drop every model kept for reuse, so a memory measurement that follows starts without them."""
        self._loaded.clear()

    def classifier(self) -> tuple[Any, models.ModelInfo]:
        """The sentiment classifier pipeline on this run's device, loaded once per run and recorded in the report."""
        key = ("classifier", str(self.device))
        if key not in self._loaded:
            self._loaded[key] = models.load_classifier(source=self.source, device=self.device)
            self.record(self._loaded[key][1])
        return self._loaded[key]

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


@dataclass
class OutputLock:
    """The output folder's lock (filelock: flock on Linux and macOS, LockFileEx on Windows) and its owner note."""

    lock: FileLock
    owner: Path

    def close(self) -> None:
        """Release the folder for the next run."""
        with contextlib.suppress(OSError):  # the folder may be gone by now (the report then went to a temp folder)
            self.owner.unlink()
        self.lock.release()


def claim_output_dir(out_dir: Path, script: str) -> OutputLock:
    """Create the output folder, prove a file can be written there, check free space, and lock it for this run."""
    where = f"output folder {out_dir}"
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{where} is a file, not a folder; pass --output-dir a folder")
    lock = FileLock(out_dir / LOCK_NAME, thread_local=False)  # any thread may end the run and release it
    owner = out_dir / OWNER_NAME
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"probe")
        probe.unlink()
        free = shutil.disk_usage(out_dir).free
        if free < MIN_FREE_BYTES:
            raise UserError(f"{where} has {free / MIB:.1f} MiB free; a run needs {MIN_FREE_BYTES // MIB} MiB for its "
                            "charts and reports")
        lock.acquire(blocking=False)
        owner.write_text(f"{script}, pid {os.getpid()}, started {time.strftime('%H:%M:%S')}", encoding="utf-8")
    except Timeout:
        try:
            holder = owner.read_text(encoding="utf-8").strip()
        except OSError:  # the holder has not written it yet
            holder = ""
        raise UserError(f"{where} is in use by another run ({holder or 'another process'}); wait for it to finish or "
                        "pass another --output-dir") from None
    except OSError as error:
        if lock.is_locked:
            lock.release()
        raise UserError(f"{where} cannot be created or written to ({error.strerror or error}); "
                        "pass --output-dir a folder you can write to") from None
    return OutputLock(lock, owner)


_current: Context | None = None  # this process's run: one at a time, so a new start() ends the previous one


class _UnusedHeadsOnly(logging.Filter):
    """Drops transformers' load report when it lists only UNEXPECTED keys: a checkpoint's heads (masked-LM,
    pooler) that the chosen Auto class does not use, as with the real bert-base-uncased. MISSING keys still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "LOAD REPORT" not in message or "MISSING" in message or "MISMATCH" in message


def quiet_transformers() -> None:
    """transformers' progress bars off and its unused-heads load reports dropped: they bury the lesson's own lines."""
    hf_logging.disable_progress_bar()
    logger = logging.getLogger("transformers.modeling_utils")
    if not any(isinstance(f, _UnusedHeadsOnly) for f in logger.filters):
        logger.addFilter(_UnusedHeadsOnly())


def start(script_file: str, args: argparse.Namespace, roles: tuple[str, ...] = tuple(models.ROLES)) -> Context:
    """Check the device, the model caches and that the models for `roles` (roles or catalog names; by default every
    role the lessons use) can be loaded, claim the output folder, apply threads and seed, print the banner, open
    the report."""
    global _current
    if _current is not None:
        _current.close()
        _current = None
    quiet_transformers()
    device = pick_device(args.device)
    if args.source != "hub":  # twins and the converted decoder are built there
        models.check_cache_root()
    models.check_hub_cache(args.source)
    models.check_models(roles, args.source)
    stem = Path(script_file).stem
    out_dir = args.output_dir if args.output_dir is not None else Path(script_file).resolve().parent / "outputs" / stem
    lock = claim_output_dir(out_dir, stem)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    environment = describe_environment(device)
    environment["source"] = args.source
    environment["quick"] = bool(args.quick)
    environment["seed"] = args.seed
    environment["peak_rss_method"] = peak_rss_method()
    print(f"{stem}  |  device {device}  |  torch {environment['torch']}  transformers {environment['transformers']}"
          f"  bitsandbytes {environment['bitsandbytes'] or 'not installed'}")
    print(f"CPU: {environment['cpu']}  ({environment['physical_cores']} cores / {environment['logical_cores']} threads,"
          f" torch uses {environment['torch_threads']})  RAM {environment['ram_gib']} GiB")
    if environment["gpu"]:
        gpu = environment["gpu"]
        print(f"GPU: {gpu['name']}  {gpu['memory_gib']} GiB  compute capability {gpu['capability']}  driver "
              f"{gpu['driver'] or 'unknown'}  fp32 matmul precision {environment['float32_matmul_precision']}")
    print(f"model source: {args.source}  |  outputs: {out_dir}")
    report = Report(stem, out_dir, environment)
    _current = Context(args=args, device=device, out_dir=out_dir, report=report, output_lock=lock)
    report.calibration["start"] = calibrate(device)
    return _current


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM handler: stop like Ctrl-C; a second SIGTERM must not cut the partial report's write short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


_output_closed = False  # set once a run's stdout or stderr lost its reader: the run stops once, not at every print


class _StopWhenClosed:
    """A run's sys.stdout or sys.stderr: when its reader goes away (`| head`, quitting `less`), Python's documented
    recipe for SIGPIPE: the descriptor is pointed at the null device with os.dup2, so later writes and the exit flush
    succeed, and the run stops once with OutputClosed (a partial report, exit 141) instead of a BrokenPipeError."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        """Write through; a closed reader stops the run."""
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._closed()
            return len(text)

    def flush(self) -> None:
        """Flush through; a closed reader stops the run."""
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._closed()

    def _closed(self) -> None:
        """Send the rest to the null device and raise OutputClosed, the first time only."""
        global _output_closed
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
        except (OSError, ValueError):  # a stream without a descriptor (a test's capture): nothing to redirect
            pass
        if not _output_closed:
            _output_closed = True
            raise OutputClosed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def printable(stream: Any, environ: dict[str, str] | None = None) -> None:
    """Make a text stream print any character: the lessons print Turkish and emoji, which a Windows code page
    (cp1252, what `python lesson.py > out.txt` gets there) cannot encode. A file or pipe is switched to UTF-8, what
    editors and tools read; a terminal, or an encoding the user chose with PYTHONIOENCODING, keeps its encoding and
    escapes what it lacks (\\u0130) instead of raising UnicodeEncodeError."""
    if not hasattr(stream, "reconfigure"):  # a test's capture, or a stream someone replaced: leave it alone
        return
    environ = os.environ if environ is None else environ
    try:
        chosen = bool(environ.get("PYTHONIOENCODING")) or stream.isatty()
    except (OSError, ValueError):
        chosen = True
    with contextlib.suppress(OSError, ValueError, LookupError):
        if chosen:
            stream.reconfigure(errors="backslashreplace")
        else:
            stream.reconfigure(encoding="utf-8", errors="backslashreplace")


def _stopped(stop: KeyboardInterrupt) -> int:
    """Save the partial report (if a section's runner has not already) and return the stop's exit code: 130 (Ctrl-C),
    143 (SIGTERM) or 141 (output closed)."""
    report = _current.report if _current is not None else None
    if report is None:
        print("\nstopped before any measurement; no report written", file=sys.stderr)
    elif not report.finished:  # an output closed after the final report was written leaves nothing to mark
        if not report.partial:  # stopped between sections, outside run_section
            report.mark_interrupted(stop)
            report.write_partial()
        print(f"\n{report.interrupted}: the report written so far is marked partial: {report.out_dir / 'report.json'}",
              file=sys.stderr)
    return getattr(stop, "exit_code", 130)


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Call main and exit with its code: a UserError is one line and exit 2; Ctrl-C exits 130, SIGTERM 143, and a
    closed output (`| head`) 141, each with the partial report written."""
    global _output_closed
    _output_closed = False
    streams = sys.stdout, sys.stderr
    for stream in streams:
        printable(stream)
    sys.stdout, sys.stderr = _StopWhenClosed(sys.stdout), _StopWhenClosed(sys.stderr)
    # Windows has SIGTERM too (only SIGPIPE is missing, and a closed pipe arrives as BrokenPipeError everywhere);
    # the guard keeps a Python without it running.
    previous = signal.signal(signal.SIGTERM, _terminate) if hasattr(signal, "SIGTERM") else None
    try:
        code = main(argv)
        sys.stdout.flush()  # a reader gone before the last buffered lines shows up here, not at interpreter exit
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt as stop:
        code = _stopped(stop)
    finally:
        if hasattr(signal, "SIGTERM"):
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        if _current is not None:
            _current.close()
        sys.stdout, sys.stderr = streams
    sys.exit(code)
