"""`make gpu-check`: every lesson with --quick --device cuda, then the CUDA tests, as one pass/fail table."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted(ROOT.glob("0[1-4]_*.py"))
OUT = ROOT / "outputs" / "gpu-check"
LESSON_TIMEOUT_S = 240  # the whole check is meant to fit in 5 minutes on an H100


def run(name: str, command: list[str], timeout_s: float) -> dict:
    """Run one check, keep its output in outputs/gpu-check/<name>.log, and summarise it as a table row."""
    OUT.mkdir(parents=True, exist_ok=True)
    log = OUT / f"{name}.log"
    started = time.perf_counter()
    try:
        with open(log, "w", encoding="utf-8") as stream:
            code = subprocess.run(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT,
                                  timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    return {"check": name, "result": "pass" if code == 0 else f"FAIL ({code})",
            "seconds": round(time.perf_counter() - started, 1), "log": str(log.relative_to(ROOT))}


def failed_sections(lesson: Path) -> str:
    """The failed and skipped sections a lesson's report lists, for the table's note column."""
    report = OUT / lesson.stem / "report.json"
    if not report.is_file():
        return "no report written"
    data = json.loads(report.read_text(encoding="utf-8"))
    notes = [f"failed: {title}" for title in data.get("failures", {})]
    notes += [f"skipped: {what}" for what in data.get("skipped", {})]
    return "; ".join(notes) or "all sections ran"


def main() -> int:
    """Run the checks and print the table; exit 1 if any failed, 2 if there is no CUDA GPU to check."""
    if not torch.cuda.is_available():
        print(f"gpu-check: torch {torch.__version__} sees no CUDA GPU; install a CUDA build (README: 'Using a GPU')",
              file=sys.stderr)
        return 2
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  CUDA {torch.version.cuda}")
    rows = []
    for lesson in LESSONS:
        command = [sys.executable, str(lesson), "--quick", "--device", "cuda", "--output-dir", str(OUT / lesson.stem)]
        row = run(lesson.stem, command, LESSON_TIMEOUT_S)
        row["note"] = failed_sections(lesson)
        rows.append(row)
        print(f"  {row['check']}: {row['result']} in {row['seconds']} s ({row['note']})", flush=True)
    tests = run("cuda-tests", [sys.executable, "-m", "pytest", "-q", "-k", "cuda or gpu"], LESSON_TIMEOUT_S)
    summary = (OUT / "cuda-tests.log").read_text(encoding="utf-8").strip().splitlines()
    tests["note"] = summary[-1] if summary else ""
    rows.append(tests)
    width = max(len(row["check"]) for row in rows)
    print(f"\n{'check'.ljust(width)}  result      seconds  note")
    for row in rows:
        print(f"{row['check'].ljust(width)}  {row['result']:<10}  {row['seconds']:>7}  {row['note']}")
    return 0 if all(row["result"] == "pass" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
