"""`llmcl doctor`, the GPU self-check: its no-CUDA answer, its report, and the checks themselves run on the CPU
(builtin:tiny) so that a GPU session finds them working."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from llmcl import doctor, methods


def test_without_cuda_it_says_so_in_one_line_and_exits_0(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = run_cli("doctor")
    assert res.exit_code == 0
    assert res.output.strip().count("\n") == 0 and "no CUDA device" in res.output


def test_an_unknown_check_is_a_one_line_error():
    res = run_cli("doctor", "--only", "methods,zer02")
    assert res.exit_code == 2 and "--only 'zer02': expected some of methods, zero2, zero3, eval, throughput" in res.stderr


def test_mfu_is_six_flops_per_parameter_and_token_over_the_peak():
    assert doctor.mfu(10_000, 1_000_000_000, 989e12) == pytest.approx(6e13 / 989e12)
    assert doctor.mfu(10_000, 1_000_000_000, None) is None and doctor.mfu(None, 10, 1.0) is None


def test_the_report_is_one_line_per_check_and_a_count():
    rows = [doctor.Result("seqft", True, 12.3, 45_678.9, 0.4123, 2048), doctor.Result("zero3", False, 3.0, note="exit 1: oom")]
    text = doctor.render(rows, "llmcl doctor on H200").splitlines()
    assert text[0] == "llmcl doctor on H200" and text[1].split()[:3] == ["check", "result", "seconds"]
    assert text[2].split()[:6] == ["seqft", "pass", "12.3", "45,679", "41.2%", "2,048"]
    assert text[3].split()[:6] == ["zero3", "FAIL", "3.0", "—", "—", "—"] and text[3].endswith("exit 1: oom")
    assert text[-1] == "1/2 checks passed"


@pytest.mark.slow  # 3-4 processes, ~1 min with eval,throughput, ~2.5 min with every check: -m slow (CI runs it)
@pytest.mark.parametrize("only", ["eval,throughput", None])
def test_every_check_runs_on_the_cpu(tmp_path, only):
    """The self-check on builtin:tiny: every registered method, one evaluated row and the throughput comparison
    (and, in the slow run, ZeRO-2 and ZeRO-3), each passing with its numbers."""
    out = tmp_path / "doctor.json"
    res = run_cli("doctor", "--cpu", "--json", str(out), *(["--only", only] if only else []))
    assert res.exit_code == 0, res.output
    results = {r["check"]: r for r in json.loads(out.read_text())["results"]}
    trained = [] if only else [*sorted(methods.REGISTRY), "zero2", "zero3"]
    expected = [*trained, "eval", "throughput builtin:tiny"]
    assert list(results) == expected and all(r["ok"] for r in results.values()), results
    for name in [*trained, "throughput builtin:tiny"]:
        assert results[name]["tokens_per_s"] > 0
    assert "facts exact_match" in results["eval"]["note"] and "(n=16)" in results["eval"]["note"]
    assert "llmcl/bare" in results["throughput builtin:tiny"]["note"]
    assert res.output.rstrip().endswith(f"{len(expected)}/{len(expected)} checks passed")
