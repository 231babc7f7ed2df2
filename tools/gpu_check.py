"""`make gpu-check`: a true pass/fail table on a CUDA GPU. Each lesson runs with --quick --device cuda, 03's
torch.compile path runs with its full settings (--quick does not compile), then the tests marked `cuda`. The folder
starts empty, the bundled models are built before any clock starts, and a row fails on a non-zero exit, a missing
report, a failed section, or any skip that is not on the expected list below (an error turned into a skip is a fail).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted(ROOT.glob("0[1-4]_*.py"))
OUT = ROOT / "outputs" / "gpu-check"
PREPARE_TIMEOUT_S = 900  # converting the GGUF decoder and building the twins, once per cache
LESSON_TIMEOUT_S = 900  # a --quick lesson on a T4 with a cold inductor/cuBLAS; an H100 needs a third of it
TESTS_TIMEOUT_S = 1800  # the `cuda` tests include a --quick run of 04 and two subsets of 03
# Skips a CUDA --quick run is meant to make, as regexes on "what: reason"; any other skip fails its row.
EXPECTED_SKIPS: dict[str, tuple[str, ...]] = {
    "01_autotokenizer_automodel": (),
    "02_gpt_bert_t5_comparison": (r"^fill-mask: .*no masked-LM head", r"^generation: .*encoder-only",
                                  r"^forward .*: (length \d+ is above the model's|predicted .* per-call budget)",
                                  r"^memory .*: above the model's \d+ positions"),
    "03_cpu_gpu_optimization": (r"^dynamic int8: PyTorch's dynamic int8 kernels are CPU-only",
                                r"^torch\.compile: --quick \(compiling"),
    "03 torch.compile": (),
    "04_performance_measurement": (r"^encoder batch sizes after|^classifier batch sizes after",
                                   r"^device mps: Apple's MPS backend is not available",
                                   r"^contest (PyTorch int8|ONNX Runtime|OpenVINO).*: (PyTorch's dynamic int8 kernels "
                                   r"are CPU-only|it runs on the CPU here|--quick)"),
}
PYTEST_EXPECTED_SKIPS: tuple[str, ...] = ()  # on a GPU every `cuda` test runs


def run(name: str, command: list[str], timeout_s: float) -> dict:
    """Run one check, keep its output in outputs/gpu-check/<name>.log, and summarise it as a table row."""
    log = OUT / f"{name}.log"
    started = time.perf_counter()
    try:
        with open(log, "w", encoding="utf-8") as stream:
            code = subprocess.run(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT,
                                  timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        code = f"timeout after {timeout_s} s"
    return {"check": name, "code": code, "seconds": round(time.perf_counter() - started, 1),
            "log": str(log.relative_to(ROOT))}


def unexpected(skips: dict[str, str], expected: tuple[str, ...]) -> list[str]:
    """The skips ("what: reason") that match none of the expected patterns."""
    return [f"{what}: {reason}" for what, reason in skips.items()
            if not any(re.search(pattern, f"{what}: {reason}") for pattern in expected)]


def lesson_verdict(report: Path, expected: tuple[str, ...]) -> tuple[bool, str]:
    """Pass or fail from a lesson's report: it exists, is not partial, has no failure and no unexpected skip."""
    if not report.is_file():
        return False, "no report written"
    data = json.loads(report.read_text(encoding="utf-8"))
    problems = [f"failed: {title}" for title in data.get("failures", {})]
    problems += ["report is partial"] if data.get("partial") else []
    problems += [f"unexpected skip: {line}" for line in unexpected(data.get("skipped", {}), expected)]
    expected_count = len(data.get("skipped", {})) - sum(p.startswith("unexpected") for p in problems)
    return not problems, "; ".join(problems) or f"all sections ran ({expected_count} expected skips)"


def pytest_verdict(junit: Path, expected: tuple[str, ...]) -> tuple[bool, str]:
    """Pass or fail from pytest's JUnit XML: at least one test ran, none failed or errored, no unexpected skip."""
    if not junit.is_file():
        return False, "no JUnit report written"
    cases = ElementTree.parse(junit).getroot().iter("testcase")
    outcome = {"passed": 0, "failed": 0, "skipped": 0}
    skips: dict[str, str] = {}
    for case in cases:
        name = f"{case.get('classname')}.{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            outcome["failed"] += 1
        elif (skipped := case.find("skipped")) is not None:
            outcome["skipped"] += 1
            skips[name] = skipped.get("message", "")
        else:
            outcome["passed"] += 1
    odd = unexpected(skips, expected)
    summary = f"{outcome['passed']} passed, {outcome['failed']} failed, {outcome['skipped']} skipped"
    ok = outcome["passed"] > 0 and not outcome["failed"] and not odd
    return ok, summary + "".join(f"; unexpected skip: {line}" for line in odd)


def main() -> int:
    """Run the checks and print the table; exit 1 if any failed, 2 if there is no CUDA GPU to check."""
    if not torch.cuda.is_available():
        print(f"gpu-check: torch {torch.__version__} sees no CUDA GPU; install a CUDA build (README: 'Using a GPU')",
              file=sys.stderr)
        return 2
    shutil.rmtree(OUT, ignore_errors=True)  # a crash must not show the previous run's reports as this run's
    OUT.mkdir(parents=True)
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  CUDA {torch.version.cuda}", flush=True)
    prepare = run("prepare models", [sys.executable, "-c", "from common import models\nfor role in models.ROLES:\n"
                                     "    if role != 'classifier': models.checkpoint(role, 'bundled')"],
                  PREPARE_TIMEOUT_S)
    rows = [{**prepare, "ok": prepare["code"] == 0, "note": "bundled models and twins built outside the clocks"}]
    lessons = [(lesson.stem, lesson, ["--quick"]) for lesson in LESSONS]
    lessons.insert(3, ("03 torch.compile", LESSONS[2], ["--only", "attention"]))
    for name, lesson, options in lessons:
        folder = OUT / name.replace(" ", "-")
        command = [sys.executable, str(lesson), *options, "--device", "cuda", "--source", "bundled",
                   "--output-dir", str(folder)]
        row = run(name.replace(" ", "-"), command, LESSON_TIMEOUT_S)
        ok, row["note"] = lesson_verdict(folder / "report.json", EXPECTED_SKIPS[name])
        rows.append({**row, "check": name, "ok": ok and row["code"] == 0})
        print(f"  {name}: {'pass' if rows[-1]['ok'] else 'FAIL'} in {row['seconds']} s ({row['note']})", flush=True)
    junit = OUT / "cuda-tests.xml"
    tests = run("cuda-tests", [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                               f"--junitxml={junit}"], TESTS_TIMEOUT_S)
    ok, tests["note"] = pytest_verdict(junit, PYTEST_EXPECTED_SKIPS)
    rows.append({**tests, "ok": ok and tests["code"] == 0})
    width = max(len(row["check"]) for row in rows)
    print(f"\n{'check'.ljust(width)}  result  seconds  note")
    for row in rows:
        result = "pass" if row["ok"] else "FAIL" if row["code"] == 0 else f"FAIL ({row['code']})"
        print(f"{row['check'].ljust(width)}  {result:<6}  {row['seconds']:>7}  {row['note']}")
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
