#!/usr/bin/env python3
"""Every GPU check of minicirc in one run (issue 30). scripts/gpu_check.sh calls this; stdlib only.

    bash scripts/gpu_check.sh [OUT]              # on a machine with a GPU; OUT defaults to ./gpu-check
    bash scripts/gpu_check.sh --dry-run [OUT]    # the same plumbing on the CPU with tiny sizes (CI runs it)

1. Setup: the torch that is installed if it has CUDA (else `pip install torch==2.13.0`), the package's
   Python dependencies and ninja where missing (pip, which fails quietly offline: the checks that need a
   missing package then say so), and the C++/CUDA extension built in place (setup.py build_ext --inplace;
   every command runs with this checkout first on PYTHONPATH). Prints the device, driver, torch and CUDA
   versions. The dry run installs and builds only what is missing.
2. The checks, in this order, each in its own process with its own time limit, the whole within --budget
   seconds (470; 180 for the dry run): a check is given at most what is left, and one that would get less
   than 15 s is skipped, so one hang cannot eat the rest.
     ops tests      pytest tests/test_ops.py -k cuda: the CUDA kernels against the torch reference, opcheck
     device tests   pytest tests/test_device.py -k cuda: find_circuit and faithfulness, CUDA run vs CPU run
     demo           python -m minicirc demo --device cuda --quick (= `minicirc demo`)
     kernels        scripts/bench_kernels.py --device cuda at N=4096, d=512, 32768 features: the sparse ops
                    against the dense torch path, and the encode's share of a plain matmul's throughput
     circuit        scripts/bench_circuit.py --preset pythia70m --device cuda --against-cpu: find_circuit's
                    time and peak GPU memory, node and edge effects against the CPU run's (<= 1e-4)
     sanitizer      compute-sanitizer (memcheck) on the CUDA tests of tests/test_ops.py, where installed
   The dry run runs the same commands with --device cpu, tiny sizes and the tests' cpu variants (MODES).
3. Writes to OUT: gpu-report.md (one line per check: result, number, limit, time), results.json (all of
   it, the benchmarks' own JSON included), gpu-check.log (every command with its output) and
   demo-report.md (the demo's report.md).

Results: pass / fail for correctness, met / missed for performance targets (reported, never a failure),
skip with its reason, info for numbers without a limit. Exit status 1 if any check failed, else 0.
GPU_CHECK_COMMIT=<sha> names the commit in the report where the checkout has no .git.
"""
import argparse
import datetime
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The only differences between the GPU run and its dry run: the device, the sizes (and which tests of
# tests/test_ops.py: the device's variants), the time limits.
MODES = {
    "gpu": {
        "device": "cuda",
        "budget": 470,      # the issue's 8 minutes on an H100, less the time to stop a check and write up
        # every test of tests/test_ops.py that runs on cuda, opcheck included (CI runs the cpu variants)
        "ops_tests": "cuda",
        "kernels": ["--n", "4096", "--d", "512", "--s", "32768", "--l0", "64", "--reps", "20"],
        "circuit": [],      # the preset's own sizes: Pythia-70M shapes, 19 SAEs x 32768 features, 4 x 32 tokens
        "limits": {"setup": 240, "ops tests": 120, "device tests": 90, "demo": 90, "kernels": 90, "circuit": 180,
                   "sanitizer": 180},
    },
    "dry": {
        "device": "cpu",
        "budget": 180,
        # the cpu variants, without opcheck (30 s on 2 cores; CI's test run has just run it)
        "ops_tests": "cpu and not opcheck",
        "kernels": ["--n", "256", "--d", "64", "--s", "1024", "--l0", "16", "--reps", "2"],
        "circuit": ["--d-model", "32", "--d-mlp", "64", "--layers", "2", "--heads", "4", "--vocab", "100",
                    "--features", "256", "--l0", "16", "--examples", "2", "--pos", "4", "--steps", "2"],
        "limits": {"setup": 120, "ops tests": 60, "device tests": 60, "demo": 60, "kernels": 60, "circuit": 90,
                   "sanitizer": 60},
    },
}
MIN_SECONDS = 15            # a check given less than this by the budget is skipped
RUNTIME_DEPS = ["numpy", "safetensors", "tokenizers", "tqdm", "matplotlib"]    # setup.py's install_requires
TEST_DEPS = ["pytest", "transformers"]          # what tests/test_ops.py and tests/test_device.py need
# The tests compute-sanitizer watches: both ops' kernels on every sample shape, k and dtype ({device}: the
# dry run selects the same tests' cpu variants).
SANITIZER_TESTS = "{device} and (match_reference or topk_more_than_positive or float32_and_bfloat16)"
KERNEL_TOLERANCE = 1e-4     # sparse ops vs dense path, relative to the largest effect
SPEEDUP_TARGET = 4.0        # the CUDA targets bench_kernels.py prints
ENCODE_SHARE_TARGET = 0.5
FAITHFULNESS_TOLERANCE = 1e-3
LOG_SECTION_BYTES = 1 << 19     # per command in gpu-check.log: the log stays a few MB

# Run with the checked python: what torch, the packages and the extension are (one JSON line).
PROBE = r"""
import importlib.util, json, os, sys
r = {"python": sys.version.split()[0], "executable": sys.executable, "cores": os.cpu_count()}
def found(m):
    try:
        return importlib.util.find_spec(m) is not None
    except (ImportError, ValueError):
        return False
r["modules"] = {m: found(m) for m in sys.argv[1].split(",")}
try:
    import torch
    r.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if r["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        r.update(device=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                 sms=p.multi_processor_count, gpu_count=torch.cuda.device_count())
    try:
        from torch.utils.cpp_extension import CUDA_HOME
        r["cuda_home"] = CUDA_HOME
    except Exception as e:
        r["cuda_home_error"] = repr(e)
except Exception as e:
    r["torch_error"] = repr(e)
try:
    import minicirc
    from minicirc import ops
    r.update(minicirc=os.path.dirname(os.path.abspath(minicirc.__file__)), ext=ops.extension_loaded(),
             cuda_ext=ops.cuda_extension_loaded())
    for name in ("_C", "_C_cuda"):   # where the libraries come from (an editable install elsewhere can serve them)
        spec = importlib.util.find_spec("minicirc." + name)
        r[name + "_file"] = spec.origin if spec is not None else None
except Exception as e:
    r["minicirc_error"] = repr(e)
print(json.dumps(r))
"""


def line(check, status, value="", limit="", note=""):
    return {"check": check, "status": status, "value": value, "limit": limit, "note": note}


def fmt_s(seconds):
    return "–" if seconds is None else f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def short(text, n=300):
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 1] + "…"


# ----------------------------------------------------------------------------- running commands

class Runner:
    """Runs each command in its own process group with a time limit cut to what is left of the budget, its
    output to a log in the work folder and to the combined log."""

    def __init__(self, work, budget, log_path, env):
        self.work, self.env, self.log_path = work, env, log_path
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget
        self.n = 0

    def left(self):
        return self.deadline - time.monotonic()

    def run(self, name, argv, limit, env=None, use_budget=True, shown=None):
        """`shown`: the command as the log and results.json show it (default: argv)."""
        self.n += 1
        timeout = min(limit, self.left()) if use_budget else limit
        rec = {"name": name, "argv": [str(a) for a in argv], "limit_s": limit, "timeout_s": round(max(timeout, 0)),
               "rc": None, "seconds": None, "timed_out": False, "output": "", "shown": shown}
        if timeout < MIN_SECONDS:
            rec["skipped"] = f"no time left in the budget ({max(self.left(), 0):.0f} s left)"
            self._log(rec)
            return rec
        path = os.path.join(self.work, f"cmd{self.n:02d}.log")
        t = time.monotonic()
        with open(path, "w") as out:
            try:
                p = subprocess.Popen(rec["argv"], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=ROOT, env={**self.env, **(env or {})}, start_new_session=True)
            except OSError as e:
                rec.update(rc=127, seconds=0.0, output=f"could not start: {e}")
                self._log(rec)
                return rec
            try:
                rec["rc"] = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rec["timed_out"] = True
                stop_group(p)
                rec["rc"] = p.returncode
        rec["seconds"] = time.monotonic() - t
        with open(path, errors="replace") as f:
            rec["output"] = f.read()
        self._log(rec)
        return rec

    def _log(self, rec):
        state = (rec.get("skipped") or (f"TIMED OUT after {rec['seconds']:.0f} s (limit {rec['timeout_s']} s)"
                                         if rec["timed_out"] else f"exit {rec['rc']} after {rec['seconds']:.1f} s"))
        text = rec["output"]
        if len(text) > LOG_SECTION_BYTES:
            cut = LOG_SECTION_BYTES // 4
            text = text[:cut] + f"\n[... {len(text) - 4 * cut} characters left out ...]\n" + text[-3 * cut:]
        with open(self.log_path, "a") as f:
            f.write(f"\n===== {rec['name']}: {rec['shown'] or ' '.join(rec['argv'])}\n===== {state}\n{text}")


def stop_group(p):
    """SIGTERM to the command's process group, SIGKILL if it is still there 5 s later."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def failed_run_note(rec):
    if rec.get("skipped"):
        return rec["skipped"]
    if rec["timed_out"]:
        return f"timed out after {rec['seconds']:.0f} s (limit {rec['timeout_s']} s)"
    last = [ln for ln in rec["output"].strip().splitlines() if ln.strip()][-1:]
    return f"exit {rec['rc']}" + (f": {short(last[0], 200)}" if last else "")


# ----------------------------------------------------------------------------- parsers (pure functions)

def parse_junit(path):
    """Counts of a pytest --junitxml file, the tests that ran on cuda, failures and skip reasons."""
    root = ET.parse(path).getroot()
    s = {"tests": 0, "passed": 0, "failed": 0, "skipped": 0, "cuda_passed": 0, "failures": [], "skip_reasons": []}
    for case in root.iter("testcase"):
        s["tests"] += 1
        name = case.get("name", "")
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            s["failed"] += 1
            s["failures"].append(name)
        elif "skipped" in kinds:
            s["skipped"] += 1
            reason = case.find("skipped").get("message", "")
            if reason not in s["skip_reasons"]:
                s["skip_reasons"].append(reason)
        else:
            s["passed"] += 1
            s["cuda_passed"] += "cuda" in name
    # Errors outside any test case (collection errors) are only counted on the suite.
    for suite in root.iter("testsuite"):
        extra = int(suite.get("errors", 0)) + int(suite.get("failures", 0))
        s["failed"] = max(s["failed"], extra)
    return s


def pytest_line(check, rec, summary, require_cuda, limit):
    if summary is None:
        return line(check, "skip" if rec.get("skipped") else "fail", "no result", limit, failed_run_note(rec))
    value = f"{summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped"
    if summary["cuda_passed"]:
        value += f" ({summary['cuda_passed']} on cuda)"
    if summary["failed"]:
        return line(check, "fail", value, limit, "failed: " + short(", ".join(summary["failures"][:6]), 200))
    if summary["tests"] == 0:
        return line(check, "fail", value, limit, "no test selected")
    if rec["timed_out"] or rec["rc"] not in (0, None):
        return line(check, "fail", value, limit, failed_run_note(rec))
    if summary["passed"] == 0:
        return line(check, "skip", value, limit, "skipped: " + short("; ".join(summary["skip_reasons"][:2]), 200))
    if require_cuda and summary["cuda_passed"] == 0:
        return line(check, "fail", value, limit, "no test ran on cuda")
    return line(check, "pass", value, limit)


def sanitizer_errors(output):
    """compute-sanitizer's '========= ERROR SUMMARY: N errors' (None when it printed none)."""
    found = re.findall(r"ERROR SUMMARY:\s+(\d+) error", output)
    return int(found[-1]) if found else None


def sanitizer_reports(output):
    """The error reports compute-sanitizer printed so far ('========= Invalid __global__ read ...'), for a
    run stopped before its summary."""
    return re.findall(r"^========= (?:Invalid|Program hit|Error|Race|Uninitialized|Barrier|Leaked|Misaligned)"
                      r"[^\n]*", output, re.M)


def sanitizer_line(ln, rec, dry, limit):
    """Turns the pytest line of the sanitizer's run into the sanitizer's line (in place)."""
    errors, reports = sanitizer_errors(rec["output"]), sanitizer_reports(rec["output"])
    unsupported = re.search(r"(Device not supported|not supported on this)[^\n]*", rec["output"])
    if dry:
        ln["status"] = "skip" if ln["status"] in ("pass", "skip") else ln["status"]
        ln["note"] = "; ".join(filter(None, ["dry run: no GPU, the selected tests ran without compute-sanitizer",
                                             ln["note"] if ln["status"] == "fail" else ""]))
    elif unsupported and not errors:    # e.g. under gVisor: the tool cannot watch this GPU, not our code's fault
        ln.update(status="skip", note=f"compute-sanitizer: {short(unsupported.group(0), 150)}")
    elif errors is None and rec["timed_out"] and not reports:   # memcheck is slow: unfinished, nothing found
        ln.update(status="skip", value="unfinished; " + ln["value"],
                  note=f"stopped at its time limit ({rec['seconds']:.0f} s) under memcheck before its summary; "
                       "no error reported until then")
    elif errors is None and reports:
        ln.update(status="fail", value=f"{len(reports)}+ errors (unfinished)",
                  note=short(reports[0], 200) + "; see gpu-check.log")
    elif errors is None:
        ln.update(status="fail", note="; ".join(filter(None, [ln["note"], "no ERROR SUMMARY from compute-sanitizer"])))
    else:
        ln["value"] = f"{errors} errors; " + ln["value"]
        if errors:
            ln.update(status="fail", note="see gpu-check.log for the sanitizer's report")
    ln["limit"] = limit
    return ln


def demo_lines(rec, results, limit):
    check = "demo (minicirc demo --quick)"
    if rec["rc"] != 0 or results is None:
        return [line(check, "fail", "no result" if results is None else f"exit {rec['rc']}", limit,
                     failed_run_note(rec))]
    faith = results["_meta"]["full_model_faithfulness"]
    worst = max(abs(v - 1) for v in faith.values())
    value = (f"{fmt_s(rec['seconds'])}; full-model faithfulness {min(faith.values()):.5f} to "
             f"{max(faith.values()):.5f} over {len(faith)} templates")
    ok = worst <= FAITHFULNESS_TOLERANCE
    return [line(check, "pass" if ok else "fail", value, limit,
                 "" if ok else f"full-model faithfulness should be 1 (± {FAITHFULNESS_TOLERANCE:g})")]


def kernels_lines(rec, data, limit, device):
    """bench_kernels.py --device D --json: correctness (pass/fail), the CUDA targets (met/missed), memory."""
    if data is None or "device" not in data:
        return [line("kernels: sparse ops vs dense path", "fail", "no result", limit, failed_run_note(rec))]
    r = data["device"]
    ext = r["cuda_extension_loaded"] if device == "cuda" else r["extension_loaded"]
    note = "" if ext else f"{device} extension NOT loaded: the torch reference path was timed"
    where = f"N={r['n']} d={r['d']} S={r['s']} L0~{r['l0']} on {r['device_name']}"
    ok = r["rel_diff"] <= KERNEL_TOLERANCE and rec["rc"] == 0
    out = [line("kernels: sparse ops vs dense path (correctness)", "pass" if ok else "fail",
                f"max rel. diff {r['rel_diff']:.1e} on the first {r['check_rows']} rows ({r['nnz']} active)",
                f"<= {KERNEL_TOLERANCE:g}; {limit}", where if ok else (failed_run_note(rec) if rec["rc"] else where)),
           line("kernels: speed-up of the sparse ops vs the dense torch path",
                "met" if r["speedup"] >= SPEEDUP_TARGET else "missed",
                f"{r['speedup']:.2f}x ({r['ms_dense']:.2f} ms -> {r['ms_sparse']:.2f} ms)", f">= {SPEEDUP_TARGET:g}x",
                note),
           line("kernels: encode's share of the measured matmul throughput",
                "met" if r["encode_share_of_matmul"] >= ENCODE_SHARE_TARGET else "missed",
                f"{r['encode_share_of_matmul']:.2f} (encode {r['encode_tflops']:.3g} TFLOP/s, matmul "
                f"{r['matmul_tflops']:.3g} TFLOP/s)", f">= {ENCODE_SHARE_TARGET:g}", note)]
    mem = "n/a" if r["memory_ratio"] is None else f"{r['memory_ratio']:.3f}"
    out.append(line("kernels: peak memory, sparse / dense", "info",
                    f"{mem} ({r['mb_sparse']:.0f} MB / {r['mb_dense']:.0f} MB)", ""))
    return out


def circuit_lines(rec, data, limit, device):
    """bench_circuit.py --against-cpu --json: effects device vs cpu (pass/fail), time and peak memory (info)."""
    check = f"circuit: node and edge effects, {device} vs cpu"
    if data is None:
        return [line(check, "fail", "no result", limit, failed_run_note(rec))]
    runs = data.get("runs", {})
    w = data["workload"]
    size = (f"d {w['d-model']}, {w['layers']} layers, {w['features']} features, {w['examples']} x {w['pos']} "
            f"tokens, IG {w['steps']} steps + edges")
    out = []
    if "node_rel_diff" in data:
        value = f"nodes {data['node_rel_diff']:.1e}, edges {data['edge_rel_diff']:.1e} (largest relative difference)"
        out.append(line(check, "pass" if data["ok"] else "fail", value, f"<= {data['tolerance']:g}", size))
    else:
        failed = [k for k, v in runs.items() if "failed" in v]
        if failed:
            last = (runs[failed[0]]["stderr"].strip().splitlines() or [""])[-1]
            note = f"{', '.join(runs[k]['device'] for k in failed)} run failed: {short(last, 200)}"
        else:
            note = failed_run_note(rec)
        out.append(line(check, "fail", "not compared", f"<= {data['tolerance']:g}", note))
    dev, cpu = runs.get("device", {}), runs.get("cpu", {})
    if "seconds" in dev:
        vs = f" (cpu: {cpu['seconds']:.1f} s on {cpu['threads']} threads)" if "seconds" in cpu else ""
        out.append(line(f"circuit: find_circuit time on {device}", "info", f"{dev['seconds']:.2f} s{vs}", limit,
                        f"{dev['kept_nodes']} nodes kept, {dev['edge_entries']} edge entries, L0 {dev['l0']:.1f}"))
        if "peak_gpu_mb" in dev:
            out.append(line("circuit: peak GPU memory allocated", "info",
                            f"{dev['peak_gpu_mb']:.0f} MB (model + SAEs {dev['gpu_before_mb']:.0f} MB)", ""))
        else:
            out.append(line("circuit: peak RSS (no GPU)", "info",
                            f"{dev['peak_rss_mb']:.0f} MB (SAE weights {dev['sae_weights_mb']:.0f} MB)", ""))
    return out


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- setup

def probe(runner, py, limit=120):
    rec = runner.run("probe", [py, "-c", PROBE, ",".join(RUNTIME_DEPS + TEST_DEPS + ["ninja"])], limit,
                     use_budget=False, shown=f"{py} -c PROBE (scripts/gpu_check.py): torch, packages, extension")
    try:
        return json.loads(rec["output"].strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"probe_error": short(rec["output"], 500) or failed_run_note(rec), "modules": {}}


def pip_install(runner, py, names, limit):
    # --retries 0: offline, pip gives up at once instead of retrying for minutes.
    rec = runner.run("pip install " + " ".join(names),
                     [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--retries", "0",
                      "--timeout", "15", *names], limit)
    return rec["rc"] == 0


def tool_version(argv):
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def find_sanitizer(info):
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    nvcc = shutil.which("nvcc")
    dirs = [info.get("cuda_home") and os.path.join(info["cuda_home"], "bin"),
            info.get("cuda_home") and os.path.join(info["cuda_home"], "compute-sanitizer"),
            nvcc and os.path.dirname(os.path.realpath(nvcc)),
            *sorted(glob.glob("/usr/local/cuda*/bin")), *sorted(glob.glob("/usr/local/cuda*/compute-sanitizer")),
            *sorted(glob.glob("/opt/nvidia/*/compute-sanitizer"))]
    for d in filter(None, dirs):
        if os.access(os.path.join(d, "compute-sanitizer"), os.X_OK):
            return os.path.join(d, "compute-sanitizer")
    return None


def setup(runner, py, mode, limit):
    """Installs what is missing, builds the extension in place; returns (env info, report lines)."""
    t0 = time.monotonic()
    gpu = mode == "gpu"
    lines, torch_notes, notes = [], [], []
    info = probe(runner, py)
    print(f"found: python {info.get('python')}, torch {info.get('torch', 'none')} (CUDA {info.get('torch_cuda')}, "
          f"GPU visible: {info.get('cuda_available')}{', ' + info['device'] if info.get('device') else ''})",
          flush=True)
    have_torch = "torch" in info and (info.get("torch_cuda") or not gpu)
    if not have_torch:
        why = (f"torch {info['torch']} has no CUDA" if "torch" in info else
               f"torch not importable ({short(info.get('torch_error', info.get('probe_error', '?')), 120)})")
        if pip_install(runner, py, ["torch==2.13.0"], limit):
            info = probe(runner, py)
            got = f"torch {info['torch']} (CUDA {info.get('torch_cuda')})" if "torch" in info else "no torch"
            torch_notes.append(f"{why}; `pip install torch==2.13.0` left {got}")
        else:
            torch_notes.append(f"{why}, and `pip install torch==2.13.0` failed (no network?): "
                               "nothing can run on the GPU")
    if "torch" not in info:
        lines.append(line("setup: torch", "fail", "not installed", "importable", "; ".join(torch_notes)))
    elif gpu:
        ok = bool(info.get("torch_cuda")) and info.get("cuda_available")
        value = (f"torch {info['torch']}, CUDA {info.get('torch_cuda')}, "
                 f"{'a GPU is visible' if info.get('cuda_available') else 'NO GPU visible'}")
        lines.append(line("setup: torch with CUDA", "pass" if ok else "fail", value, "CUDA torch, GPU visible",
                          "; ".join(torch_notes)))
    else:
        lines.append(line("setup: torch", "info", f"torch {info['torch']} (dry run: CPU)", "", "; ".join(torch_notes)))

    pkg = os.path.join(ROOT, "minicirc")
    here = info.get("minicirc") == pkg and os.path.dirname(info.get("_C_file") or "") == pkg
    if gpu or not (here and info.get("ext")):       # the dry run installs only what is missing
        mods = info.get("modules", {})
        for group in (RUNTIME_DEPS, TEST_DEPS, ["ninja"]):
            missing = [m for m in group if not mods.get(m) and not (m == "ninja" and shutil.which("ninja"))]
            if missing and "torch" in info:
                ok = pip_install(runner, py, missing, limit)
                notes.append(f"{'installed' if ok else 'could not install (pip failed)'}: {' '.join(missing)}")
        if "torch" in info:
            jobs = str(info.get("cores") or os.cpu_count() or 1)
            rec = runner.run("build the extension in place", [py, "setup.py", "build_ext", "--inplace"],
                             max(limit - (time.monotonic() - t0), MIN_SECONDS), env={"MAX_JOBS": jobs})
            notes.append(f"setup.py build_ext --inplace: {failed_run_note(rec) if rec['rc'] else 'ok'} "
                         f"({fmt_s(rec['seconds'])})")
            # setup.py lets the CUDA library fail with a warning only: keep it for the report.
            warned = re.findall(r"minicirc: WARNING: CUDA extension[^\n]*", rec["output"])
            info_build_warning = warned[-1] if warned else None
        else:
            info_build_warning = None
        info = probe(runner, py)
        info["build_warning"] = info_build_warning
    else:
        notes.append("the dry run found minicirc importable from this checkout with its extension: nothing installed")
    mods = info.get("modules", {})
    missing = [m for m in RUNTIME_DEPS + TEST_DEPS if not mods.get(m)]
    lines.append(line("setup: python packages", "pass" if not [m for m in missing if m in RUNTIME_DEPS] else "fail",
                      "all present" if not missing else "missing: " + ", ".join(missing),
                      ", ".join(RUNTIME_DEPS + TEST_DEPS), short("; ".join(notes), 400)))
    src = info.get("_C_file") if info.get("ext") else info.get("minicirc")
    src = src and ("this checkout" if os.path.dirname(src) == pkg or src == pkg else src)
    lines.append(line("build: minicirc._C (CPU kernels, op schemas)", "pass" if info.get("ext") else "fail",
                      "loaded" if info.get("ext") else "not loaded", "loaded",
                      f"from {src}" if src else short(info.get("minicirc_error", ""), 200)))
    if gpu:
        lines.append(line("build: minicirc._C_cuda (CUDA kernels)", "pass" if info.get("cuda_ext") else "fail",
                          "loaded" if info.get("cuda_ext") else "not loaded", "loaded",
                          "" if info.get("cuda_ext") else
                          f"CUDA_HOME={info.get('cuda_home')}; {short(info.get('build_warning') or '', 200)} "
                          "(the build's output is in gpu-check.log)"))
    else:
        lines.append(line("build: minicirc._C_cuda (CUDA kernels)", "skip", "", "loaded", "dry run: no GPU"))
    smi = tool_version(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    info["nvidia_smi"] = smi.splitlines()[0] if smi else None
    info["driver"] = smi.splitlines()[0].split(",")[1].strip() if smi and smi.count(",") >= 2 else None
    # The nvcc torch builds with (CUDA_HOME's), else the one on PATH.
    home_nvcc = info.get("cuda_home") and os.path.join(info["cuda_home"], "bin", "nvcc")
    nvcc = tool_version([home_nvcc if home_nvcc and os.path.exists(home_nvcc) else "nvcc", "--version"])
    release = [ln for ln in (nvcc or "").splitlines() if "release" in ln]
    info["nvcc"] = (release or (nvcc or "").splitlines()[-1:] or [None])[0]
    info["sanitizer"] = find_sanitizer(info)
    if info["sanitizer"]:
        v = tool_version([info["sanitizer"], "--version"])
        info["sanitizer_version"] = v.splitlines()[-1] if v else None
    info["setup_seconds"] = time.monotonic() - t0
    return info, lines


def describe(info):
    dev = (f"{info['device']} (sm_{info['capability'].replace('.', '')}, {info['gpu_memory_gib']} GiB, "
           f"{info['sms']} SMs)" if info.get("device") else "no GPU")
    return [f"device: {dev}; driver {info.get('driver') or 'n/a (no nvidia-smi)'}; {info.get('cores')} CPU cores",
            f"torch {info.get('torch', 'n/a')} (CUDA {info.get('torch_cuda') or 'none'}); nvcc: "
            f"{info.get('nvcc') or 'not found'}; compute-sanitizer: "
            f"{info.get('sanitizer_version') or info.get('sanitizer') or 'not found'}; python {info.get('python')} "
            f"({info.get('executable')})"]


# ----------------------------------------------------------------------------- the checks

def run_pytest(runner, py, check, files, limit, info, require_cuda, prefix=(), extra_note="", env=None):
    missing = [m for m in ["pytest"] + (["transformers"] if "test_device.py" in " ".join(files) else [])
               if not info.get("modules", {}).get(m)]
    if missing:
        return [line(check, "skip", "", "", f"{', '.join(missing)} not installed")], None, {}
    junit = os.path.join(runner.work, re.sub(r"\W+", "-", check) + ".xml")
    rec = runner.run(check, [*prefix, py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                             *files], limit, env=env)
    summary = parse_junit(junit) if os.path.exists(junit) else None
    out = pytest_line(check, rec, summary, require_cuda, f"all pass; {limit} s")
    if extra_note:
        out["note"] = "; ".join(filter(None, [out["note"], extra_note]))
    return [out], rec, summary


def guarded(check, parse, *args):
    """A check's lines from its parser; a parser that breaks on an unexpected result fails that check only."""
    try:
        return parse(*args)
    except Exception as e:  # noqa: BLE001
        return [line(check, "fail", "unreadable result", "", f"{type(e).__name__}: {short(e, 200)}")]


def checks(runner, py, cfg, info, out_dir, dry):
    """Yields (name, report lines, run record, raw data) for each check in order."""
    dev, lim = cfg["device"], cfg["limits"]
    lines, rec, raw = run_pytest(runner, py, f"ops tests (tests/test_ops.py -k '{cfg['ops_tests']}')",
                                 ["tests/test_ops.py", "-k", cfg["ops_tests"]], lim["ops tests"], info,
                                 require_cuda=not dry)
    yield "ops tests", lines, rec, raw
    lines, rec, raw = run_pytest(runner, py, "device tests (tests/test_device.py -k cuda)",
                                 ["tests/test_device.py", "-k", "cuda"], lim["device tests"], info,
                                 require_cuda=not dry)
    yield "device tests", lines, rec, raw

    demo_out = os.path.join(runner.work, "demo")
    rec = runner.run("demo", [py, "-m", "minicirc", "demo", "--device", dev, "--quick", "--out", demo_out,
                              "--overwrite"], lim["demo"])
    results = read_json(os.path.join(demo_out, "results.json"))
    if os.path.exists(os.path.join(demo_out, "report.md")):
        shutil.copy(os.path.join(demo_out, "report.md"), os.path.join(out_dir, "demo-report.md"))
    meta = (results or {}).get("_meta", {})
    yield "demo", guarded("demo", demo_lines, rec, results, f"exit 0; {lim['demo']} s"), rec, \
        {k: meta.get(k) for k in ("seconds", "full_model_faithfulness", "accuracy")}

    kj = os.path.join(runner.work, "kernels.json")
    rec = runner.run("kernels", [py, "scripts/bench_kernels.py", "--device", dev, *cfg["kernels"], "--json", kj],
                     lim["kernels"])
    data = read_json(kj)
    yield "kernels", guarded("kernels", kernels_lines, rec, data, f"{lim['kernels']} s", dev), rec, data

    cj = os.path.join(runner.work, "circuit.json")
    rec = runner.run("circuit", [py, "scripts/bench_circuit.py", "--preset", "pythia70m", "--device", dev,
                                 "--against-cpu", *cfg["circuit"], "--json", cj], lim["circuit"])
    data = read_json(cj)
    yield "circuit", guarded("circuit", circuit_lines, rec, data, f"{lim['circuit']} s", dev), rec, data

    check = f"sanitizer (compute-sanitizer memcheck on tests/test_ops.py's {dev} kernel tests)"
    files = ["tests/test_ops.py", "-k", SANITIZER_TESTS.format(device=dev)]
    if not dry and not info.get("sanitizer"):
        yield "sanitizer", [line(check, "skip", "", "0 errors", "compute-sanitizer not installed")], None, None
        return
    # The dry run runs the same tests without the sanitizer (no GPU): the plumbing, not the tool.
    prefix = [] if dry else [info["sanitizer"], "--tool", "memcheck", "--report-api-errors", "no", "--print-limit",
                             "20"]
    # Without the caching allocator every tensor is its own allocation, so memcheck sees accesses past its end.
    lines, rec, raw = run_pytest(runner, py, check, files, lim["sanitizer"], info, require_cuda=not dry,
                                 prefix=prefix, env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})
    if rec is not None:
        raw = {"pytest": raw, "sanitizer_errors": sanitizer_errors(rec["output"])}
        sanitizer_line(lines[0], rec, dry, f"0 errors; {lim['sanitizer']} s")
    yield "sanitizer", lines, rec, raw


# ----------------------------------------------------------------------------- the report

def commit_id():
    if os.environ.get("GPU_CHECK_COMMIT"):
        return os.environ["GPU_CHECK_COMMIT"]
    try:
        sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            return sha.stdout.strip() + (" with local changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown (no .git here; set GPU_CHECK_COMMIT)"


def write_report(out_dir, result):
    dry = result["dry_run"]
    rows, counts = [], {}
    for c in result["checks"]:
        for ln in c["lines"]:
            counts[ln["status"]] = counts.get(ln["status"], 0) + 1
            t = fmt_s(c.get("seconds")) if ln is c["lines"][0] else ""
            cells = [ln["check"], ("**FAIL**" if ln["status"] == "fail" else ln["status"]), ln["value"],
                     ln["limit"], t, ln["note"]]
            rows.append("| " + " | ".join(str(x).replace("|", "/").replace("\n", " ") for x in cells) + " |")
    title = ("DRY RUN on the CPU (tiny sizes)" if dry else "GPU run")
    md = [f"# minicirc GPU check: {title}", ""]
    if dry:
        md += ["> **Dry run** (`scripts/gpu_check.sh --dry-run`): the GPU run's commands on the CPU with tiny sizes.",
               "> It proves the script works; its numbers say nothing about a GPU, and the GPU targets are not",
               "> expected to be met here.", ""]
    info = result["env"]
    md += [f"- date: {result['started_utc']}; commit {result['commit']}; took {result['seconds']:.0f} s "
           f"(budget {result['budget_s']} s)",
           *(f"- {s}" for s in describe(info)),
           f"- command: `{result['command']}`", "",
           "| check | result | value | limit | time | note |", "|---|---|---|---|---|---|", *rows, "",
           "Result: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) +
           (". **Some checks failed.**" if counts.get("fail") else ". No check failed."), "",
           "Results: pass / fail for correctness; met / missed for the performance targets (reported, not failed);",
           "skip with its reason; info for numbers without a limit. The limit column is the check's bound and its",
           "time limit; a check is cut to what is left of the budget.", "",
           "Files: `gpu-check.log` (every command and its output, the setup's pip and build included),",
           "`results.json` (every number, the benchmarks' own JSON under `checks[].raw`), `demo-report.md`",
           "(the demo's report.md).", "",
           "Into BENCHMARKS.md (section \"GPU\"): the date, commit, device, driver, torch and CUDA lines above,",
           "then this table's rows; the kernels' and the circuit's full numbers are in results.json.", ""]
    with open(os.path.join(out_dir, "gpu-report.md"), "w") as f:
        f.write("\n".join(md))
    return "\n".join(md)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="gpu-check", help="output folder (default ./gpu-check)")
    p.add_argument("--dry-run", action="store_true", help="the same plumbing on the CPU with tiny sizes")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 470; dry run 180)")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder (demo, circuits, junit files)")
    a = p.parse_args(argv)
    mode = "dry" if a.dry_run else "gpu"
    cfg = MODES[mode]
    budget = a.budget or cfg["budget"]
    out_dir = os.path.abspath(a.out)
    os.makedirs(out_dir, exist_ok=True)
    for name in ("gpu-report.md", "results.json", "gpu-check.log", "demo-report.md"):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    work = tempfile.mkdtemp(prefix="gpu-check-work-")
    py = sys.executable
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1", TQDM_DISABLE="1", MPLBACKEND="Agg", TMPDIR=work,
               MINICIRC_CACHE=os.path.join(work, "cache"))   # a fresh cache: the demo trains its quick default
    env.pop("MINICIRC_NO_EXT", None)
    runner = Runner(work, budget, os.path.join(out_dir, "gpu-check.log"), env)
    command = " ".join(["scripts/gpu_check.sh", *(sys.argv[1:] if argv is None else argv)])
    result = {"mode": mode, "dry_run": a.dry_run, "command": command,
              "started_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "commit": commit_id(), "budget_s": budget, "device": cfg["device"], "checks": [], "env": {}}
    print(f"gpu_check: {'DRY RUN (cpu, tiny sizes)' if a.dry_run else 'GPU run'}, budget {budget:.0f} s, "
          f"output {out_dir}", flush=True)

    def record(name, lines, rec, raw):
        entry = {"name": name, "lines": lines, "raw": raw}
        if rec is not None:
            entry.update({k: rec[k] for k in ("argv", "rc", "seconds", "timeout_s", "timed_out")})
            entry["output_tail"] = rec["output"][-3000:]
        result["checks"].append(entry)
        for ln in lines:
            print(f"  {ln['status']:6s} {ln['check']}: {ln['value']}" + (f"  [{ln['note']}]" if ln["note"] else "")
                  + (f"  ({fmt_s(rec['seconds'])})" if rec is not None and ln is lines[0] else ""), flush=True)

    try:
        info, lines = setup(runner, py, mode, cfg["limits"]["setup"])
        result["env"] = info
        for s in describe(info):
            print(s, flush=True)
        record("setup", lines, None, None)
        result["checks"][-1]["seconds"] = info["setup_seconds"]
        if not a.dry_run and not (info.get("torch_cuda") and info.get("cuda_available")):
            record("cuda checks", [line("CUDA checks", "fail", "not run", "", "no CUDA torch or no visible GPU: "
                                        "see setup")], None, None)
        else:
            for name, lines, rec, raw in checks(runner, py, cfg, info, out_dir, a.dry_run):
                record(name, lines, rec, raw)
    except Exception as e:  # noqa: BLE001 - a broken driver still writes its report
        import traceback
        record("driver", [line("driver", "fail", "crashed", "", short(repr(e), 300))], None,
               {"traceback": traceback.format_exc()})
    result["seconds"] = time.monotonic() - runner.t0
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    md = write_report(out_dir, result)
    print("\n" + md, flush=True)
    if a.keep_work:
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(ln["status"] == "fail" for c in result["checks"] for ln in c["lines"]) else 0


if __name__ == "__main__":
    sys.exit(main())
