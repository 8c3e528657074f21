"""scripts/gpu_check.py, the driver of scripts/gpu_check.sh, on fake check results: what the GPU run's report
says is decided here, since the GPU branch itself only runs on a GPU (CI runs the whole dry run separately).
"""
import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "scripts", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def junit(path, cases):
    """A pytest --junitxml file; cases: (name, outcome) with outcome passed / failed / error / skipped."""
    body = []
    for name, outcome in cases:
        inner = {"passed": "", "failed": '<failure message="assert 1 == 2">trace</failure>',
                 "error": '<error message="fixture">trace</error>',
                 "skipped": '<skipped type="pytest.skip" message="no GPU: skipped">why</skipped>'}[outcome]
        body.append(f'<testcase classname="tests.test_ops" name="{name}" time="0.1">{inner}</testcase>')
    n_fail = sum(o == "failed" for _, o in cases)
    n_err = sum(o == "error" for _, o in cases)
    n_skip = sum(o == "skipped" for _, o in cases)
    path.write_text(f'<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="{n_err}" '
                    f'failures="{n_fail}" skipped="{n_skip}" tests="{len(cases)}">{"".join(body)}</testsuite>'
                    '</testsuites>')
    return str(path)


def rec(rc=0, seconds=12.0, timed_out=False, output=""):
    return {"rc": rc, "seconds": seconds, "timed_out": timed_out, "timeout_s": 90, "output": output,
            "argv": ["python", "-m", "pytest"]}


def test_pytest_results(gc, tmp_path):
    ok = gc.parse_junit(junit(tmp_path / "a.xml", [("test_x[cpu]", "passed"), ("test_x[cuda]", "passed"),
                                                   ("test_y", "skipped")]))
    assert (ok["passed"], ok["failed"], ok["skipped"], ok["cuda_passed"]) == (2, 0, 1, 1)
    ln = gc.pytest_line("ops", rec(), ok, True, "all pass")
    assert ln["status"] == "pass" and ln["value"] == "2 passed, 0 failed, 1 skipped (1 on cuda)"

    bad = gc.parse_junit(junit(tmp_path / "b.xml", [("test_x[cuda]", "failed"), ("test_z", "error"),
                                                    ("test_w", "passed")]))
    ln = gc.pytest_line("ops", rec(rc=1), bad, True, "all pass")
    assert ln["status"] == "fail" and "test_x[cuda]" in ln["note"] and "test_z" in ln["note"]

    cpu_only = gc.parse_junit(junit(tmp_path / "c.xml", [("test_x[cpu]", "passed")]))
    assert gc.pytest_line("ops", rec(), cpu_only, True, "")["note"] == "no test ran on cuda"
    assert gc.pytest_line("ops", rec(), cpu_only, False, "")["status"] == "pass"   # the dry run

    skipped = gc.parse_junit(junit(tmp_path / "d.xml", [("test_cuda_run[ig]", "skipped")]))
    ln = gc.pytest_line("device", rec(), skipped, False, "")
    assert ln["status"] == "skip" and "no GPU" in ln["note"]

    # A hang: no junit file, the command stopped at its limit.
    ln = gc.pytest_line("ops", rec(rc=-15, seconds=90.4, timed_out=True), None, True, "")
    assert ln["status"] == "fail" and ln["note"] == "timed out after 90 s (limit 90 s)"


def test_sanitizer_results(gc):
    clean = "3 passed in 80s\n========= ERROR SUMMARY: 0 errors\n"
    bad = ("========= Invalid __global__ write of size 4 bytes\n=========     at encode_kernel+0x1c0\n"
           "3 passed\n========= ERROR SUMMARY: 3 errors\n")
    assert gc.sanitizer_errors(clean) == 0 and gc.sanitizer_errors(bad) == 3
    assert gc.sanitizer_errors("1 passed in 2.0s") is None

    def result(output, dry=False, **kw):
        ln = gc.line("sanitizer", "pass", "3 passed, 0 failed, 0 skipped (3 on cuda)")
        return gc.sanitizer_line(ln, rec(output=output, **kw), dry, "0 errors")

    assert result(clean)["status"] == "pass" and result(clean)["value"].startswith("0 errors; 3 passed")
    assert result(bad)["status"] == "fail" and result(bad)["value"].startswith("3 errors")
    # Stopped at its limit: unfinished with nothing found is not a failure; with a report it is.
    assert result("=========  COMPUTE-SANITIZER\n", rc=-15, timed_out=True)["status"] == "skip"
    cut = result(bad.split("3 passed")[0], rc=-15, timed_out=True)
    assert cut["status"] == "fail" and cut["note"].startswith("========= Invalid __global__ write")
    assert result("========= Error: Device not supported\n", rc=1)["status"] == "skip"
    assert result("Traceback ...\n", rc=1)["status"] == "fail"
    assert result("3 passed\n", dry=True)["status"] == "skip"      # the dry run: no sanitizer, no GPU


def test_report_of_a_gpu_run(gc, tmp_path):
    """Fake results of every benchmark as the GPU run writes them give the right lines, and gpu-report.md
    lists each of them with its result, number and limit."""
    kernels = {"device": {"device_name": "NVIDIA H100", "n": 4096, "d": 512, "s": 32768, "l0": 64, "nnz": 1_000_000,
                          "extension_loaded": True, "cuda_extension_loaded": True, "rel_diff": 3e-7, "check_rows": 128,
                          "speedup": 5.5, "ms_dense": 11.0, "ms_sparse": 2.0, "encode_share_of_matmul": 0.3,
                          "encode_tflops": 15.0, "matmul_tflops": 50.0, "memory_ratio": 0.05, "mb_sparse": 100.0,
                          "mb_dense": 2000.0}}
    k_lines = gc.kernels_lines(rec(), kernels, "90 s", "cuda")
    assert [ln["status"] for ln in k_lines] == ["pass", "met", "missed", "info"]

    run = {"seconds": 9.5, "threads": 16, "kept_nodes": 8, "edge_entries": 5000, "l0": 64.2, "peak_rss_mb": 4000.0,
           "sae_weights_mb": 2432.0}
    workload = {"d-model": 512, "layers": 6, "features": 32768, "examples": 4, "pos": 32, "steps": 10}
    circuit = {"workload": workload, "tolerance": 1e-4, "ok": False, "node_rel_diff": 2e-6, "edge_rel_diff": 3e-3,
               "runs": {"device": {**run, "peak_gpu_mb": 3100.0, "gpu_before_mb": 2500.0},
                        "cpu": {**run, "seconds": 40}}}
    c_lines = gc.circuit_lines(rec(rc=1), circuit, "180 s", "cuda")
    assert [ln["status"] for ln in c_lines] == ["fail", "info", "info"]
    assert c_lines[0]["value"].startswith("nodes 2.0e-06, edges 3.0e-03") and c_lines[0]["limit"] == "<= 0.0001"
    assert c_lines[2]["value"] == "3100 MB (model + SAEs 2500 MB)"

    # A run that failed on the device: the comparison line says which and why.
    crashed = {"workload": workload, "tolerance": 1e-4, "ok": False,
               "runs": {"device": {"device": "cuda", "failed": 1, "stderr": "Traceback\nRuntimeError: CUDA error"}}}
    ln = gc.circuit_lines(rec(rc=1), crashed, "180 s", "cuda")[0]
    assert ln["status"] == "fail" and ln["note"] == "cuda run failed: RuntimeError: CUDA error"

    demo = {"_meta": {"full_model_faithfulness": {"simple": 1.0000002, "rc": 0.9999}}}
    d_lines = gc.demo_lines(rec(), demo, "exit 0")
    assert d_lines[0]["status"] == "pass"

    checks = [{"name": "kernels", "lines": k_lines, "seconds": 20.0}, {"name": "circuit", "lines": c_lines,
                                                                        "seconds": 70.0},
              {"name": "demo", "lines": d_lines, "seconds": 15.0}]
    result = {"dry_run": False, "started_utc": "2026-12-07 04:00 UTC", "commit": "abc1234", "seconds": 300.0,
              "budget_s": 470, "command": "scripts/gpu_check.sh out", "checks": checks,
              "env": {"device": "NVIDIA H100 80GB HBM3", "capability": "9.0", "gpu_memory_gib": 79.2, "sms": 132,
                      "driver": "580.159.04", "cores": 16, "torch": "2.11.0+cu130", "torch_cuda": "13.0",
                      "nvcc": "Build cuda_13.0", "python": "3.12.3", "executable": "/usr/bin/python3"}}
    md = gc.write_report(str(tmp_path), result)
    assert md == (tmp_path / "gpu-report.md").read_text()
    rows = [r for r in md.splitlines() if r.startswith("| ") and not r.startswith("| check")]
    assert len(rows) == len(k_lines) + len(c_lines) + len(d_lines)
    assert "| kernels: encode's share of the measured matmul throughput | missed | 0.30 " in md
    assert "| circuit: node and edge effects, cuda vs cpu | **FAIL** |" in md
    assert "NVIDIA H100 80GB HBM3 (sm_90, 79.2 GiB, 132 SMs); driver 580.159.04" in md
    assert "DRY RUN" not in md and "Some checks failed" in md


def test_time_limit_and_budget(gc, tmp_path, monkeypatch):
    """A hanging command is stopped at its limit with its output kept; with the budget spent, a command is not
    started at all."""
    monkeypatch.setattr(gc, "MIN_SECONDS", 0)
    log = tmp_path / "all.log"
    runner = gc.Runner(str(tmp_path), 60, str(log), dict(os.environ))
    r = runner.run("hang", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 2)
    assert r["timed_out"] and r["seconds"] < 15 and "started" in r["output"]
    assert "===== hang: " in log.read_text() and "TIMED OUT" in log.read_text()
    spent = gc.Runner(str(tmp_path), 0, str(log), dict(os.environ))
    r = spent.run("late", [sys.executable, "-c", "print(1)"], 30)
    assert r["rc"] is None and r["skipped"].startswith("no time left")
    json.dumps(r)   # every record goes into results.json
