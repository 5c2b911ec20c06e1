"""Which torch builds have passed vlmtrain's CUDA tests: the record behind `attn_backend: auto` and `train.compile: auto`.

FlexAttention's backward and the compiled layers run on CUDA only, so a CPU machine cannot tell whether they
work on a given torch. `benchmarks/gpu.sh` runs the CUDA tests (`tests/test_cuda_fast.py`, pytest mark `gpu`)
with a JUnit report and then `python -m vlmtrain.models.cuda_validation record REPORT`, which adds the torch
version to `cuda_validated.json` (beside this module; commit it) only when every one of those tests ran on
CUDA and passed: none failed, none skipped, none missing. `auto` then picks the fast path on CUDA for exactly
the torch versions listed; anything else (CPU, an untested torch) stays on the safe path, and the log says why.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

import torch

from vlmtrain.durable import write_text_durably

RECORD = Path(__file__).with_name("cuda_validated.json")
TEST_FILE = "tests/test_cuda_fast.py"
REQUIRED_TESTS = (
    "test_flex_forward_backward_match_sdpa_bf16",
    "test_flex_compiles_once_across_lengths_cuda",
    "test_compiled_training_matches_eager_cuda",
)
"""Tests (by function name; parametrised cases count per function) that must all have passed."""


def validated_versions(path: Path | None = None) -> dict[str, dict]:
    """torch version -> what was recorded for it (device, date); {} when nothing is recorded yet."""
    path = path or RECORD
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    versions = data.get("torch_versions") if isinstance(data, dict) else None
    if not isinstance(versions, dict):
        raise ValueError(
            f"{path}: expected {{'torch_versions': {{version: {{...}}}}}}; rewrite it with `record`"
        )
    return versions


def cuda_fast_path(feature: str, path: Path | None = None) -> tuple[bool, str]:
    """(use the CUDA fast path `feature`, the reason, for the log)."""
    path = path or RECORD
    if not torch.cuda.is_available():
        return False, f"{feature}: no CUDA device"
    version = torch.__version__
    entry = validated_versions(path).get(version)
    if entry is None:
        return False, (
            f"{feature}: the CUDA tests have not passed for torch {version} ({path.name} lists "
            f"{sorted(validated_versions(path)) or 'none'}; run `bash benchmarks/gpu.sh` on a GPU)"
        )
    return (
        True,
        f"{feature}: the CUDA tests passed for torch {version} on {entry.get('device')} ({entry.get('date')})",
    )


def passed_tests(junit_xml: Path) -> set[str]:
    """Names (function names, without parameters) of the test cases that passed in a pytest JUnit report;
    a function with any failed, errored or skipped case is left out."""
    root = ET.parse(junit_xml).getroot()
    passed: set[str] = set()
    bad: set[str] = set()
    for case in root.iter("testcase"):
        name = case.get("name", "").split("[")[0]
        if any(case.find(tag) is not None for tag in ("failure", "error", "skipped")):
            bad.add(name)
        else:
            passed.add(name)
    return passed - bad


def record(junit_xml: Path, path: Path | None = None) -> str:
    """Add this torch to the record if the report shows every REQUIRED_TESTS case passed on CUDA."""
    path = path or RECORD
    if not torch.cuda.is_available():
        raise SystemExit("cuda_validation record: no CUDA device here; the CUDA tests cannot have run")
    missing = [t for t in REQUIRED_TESTS if t not in passed_tests(junit_xml)]
    if missing:
        raise SystemExit(
            f"{junit_xml}: not passed (failed, skipped or not run): {', '.join(missing)}; nothing recorded"
        )
    versions = validated_versions(path)
    versions[torch.__version__] = {
        "device": torch.cuda.get_device_name(),
        "cuda": torch.version.cuda,
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "tests": list(REQUIRED_TESTS),
    }
    write_text_durably(path, json.dumps({"torch_versions": versions}, indent=2, sort_keys=True) + "\n")
    return f"recorded torch {torch.__version__} in {path}"


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "record":
        raise SystemExit("usage: python -m vlmtrain.models.cuda_validation record JUNIT_XML")
    print(record(Path(sys.argv[2])))
