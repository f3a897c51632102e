"""benchmarks/chaos.py --quick: closed-loop load through two masters while a worker is
SIGKILLed and restarted, a master is SIGKILLed and restarted, and a live reload moves an
expert's replica to another worker.

One run of the script (real `moe-serve` processes on loopback) feeds every test here. What is
asserted is correctness: every call answered, with the healthy world's bits, and every
restarted or reloaded process serving again. Speed is recorded by the script, never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "chaos.py"
QUICK_CASES = ["kill_worker", "kill_master", "reload_move"]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("chaos") / "chaos.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def cases(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["case"]: c for c in result["cases"]}


def test_quick_run_has_the_worker_kill_the_master_kill_and_the_reload(
    result: dict[str, Any],
) -> None:
    assert [c["case"] for c in result["cases"]] == QUICK_CASES


def test_no_request_fails_in_any_case(result: dict[str, Any]) -> None:
    failed = {c["case"]: c["failed_codes"] for c in result["cases"] if c["failed_requests"]}
    assert failed == {}
    assert result["totals"]["failed"] == {} and result["totals"]["ok"] > 0


def test_every_case_served_calls_before_and_after_its_event(result: dict[str, Any]) -> None:
    for c in result["cases"]:
        assert c["baseline_rps"] > 0 and c["degraded_rps"] > 0, c["case"]


def test_a_restarted_worker_computes_pairs_again(result: dict[str, Any]) -> None:
    back = cases(result)["kill_worker"]["back"]
    assert back["restart_to_first_pair_s"] is not None


def test_a_restarted_master_answers_calls_again(result: dict[str, Any]) -> None:
    back = cases(result)["kill_master"]["back"]
    assert back["restart_to_first_request_s"] is not None


def test_a_moved_replica_is_computed_by_its_new_holder(result: dict[str, Any]) -> None:
    reload = cases(result)["reload_move"]["reload"]
    assert reload["rc"] == 0
    assert reload["new_holder_says"] == "worker w3: layer 0: +[0]"
    for said in reload["masters_say"]:
        assert said.endswith("layer 0 expert 0: ['w0', 'w1'] -> ['w1', 'w3']"), said
    assert reload["new_holder_serving_to_first_pair_s"] is not None
