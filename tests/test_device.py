"""Device discipline, checked without a GPU: every tensor the pipeline makes either names its device or
comes from a tensor that has one.

A factory call that relies on the default device (`torch.zeros(n)`, `torch.tensor(list)`, a sparse tensor
built without `device=`) makes a CPU tensor even when the model is on `--device cuda`, and the run fails
there (or copies every batch to the CPU and back). Here the default device is set to "meta" and any
operation that returns a meta tensor raises at once, naming the call: on a CPU-only machine this finds
the factory calls a GPU run would trip over. Inputs are made before the guard; the guarded run must give
the same files as an unguarded one.

Where a GPU is present, the last test also runs the pipeline on it and compares with the CPU run."""
import contextlib
import json
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import minicirc
from minicirc.cli import main
from test_determinism import assert_same_effects, load
from test_distributed import make_inputs


class _NoMetaResults(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                raise AssertionError(f"{func} made a tensor on the default device: give it a device")
        return out


@contextlib.contextmanager
def explicit_devices_only():
    with torch.device("meta"), _NoMetaResults():
        yield


def test_the_guard_catches_a_factory_without_device():
    x = torch.randn(3)
    with explicit_devices_only():
        assert float((x + torch.zeros(3, device=x.device)).sum()) == pytest.approx(float(x.sum()))
        with pytest.raises(AssertionError, match="default device"):
            x + torch.zeros(3)
        with pytest.raises(AssertionError, match="default device"):
            torch.sparse_coo_tensor(torch.zeros(1, 1, dtype=torch.long, device="cpu"), x[:1], (3,),
                                    check_invariants=False)


def cli(t, out, *extra):
    return main([str(a) for a in ["circuit", "--model", t / "model", "--data", t / "data.jsonl", "--out", out,
                                  "--steps", 2, "--node-threshold", 0.05, "--edge-threshold", 0.2, *extra]])


@pytest.mark.parametrize("extra", [("--saes", "SAES"), ("--saes", "neurons", "--method", "attrib",
                                                        "--aggregation", "none"),
                                   ("--saes", "SAES", "--dtype", "bfloat16")])
def test_cli_circuit_evaluate_explain_view(tmp_path, extra):
    t = make_inputs(tmp_path, 3, same_length=True)
    extra = [t / "saes" if a == "SAES" else a for a in extra]
    assert cli(t, t / "plain", *extra) == 0
    with explicit_devices_only():
        assert cli(t, t / "guarded", *extra) == 0
        assert main([str(a) for a in ["evaluate", "--model", t / "model", "--data", t / "data.jsonl",
                                      "--saes", extra[1], "--circuit", t / "guarded" / "circuit.json",
                                      "--out", t / "eval", "--first-layer", 1,
                                      *(extra[-2:] if "--dtype" in extra else [])]]) == 0
        assert main([str(a) for a in ["explain", "--model", t / "model", "--saes", extra[1], "--site", "resid_0",
                                      "--feature", 1, "--data", t / "data.jsonl"]]) == 0
        assert main(["view", str(t / "guarded" / "circuit.json")]) == 0
    for name in ("circuit.json", "effects.safetensors"):
        assert (t / "plain" / name).read_bytes() == (t / "guarded" / name).read_bytes(), name
    assert json.loads((t / "eval" / "evaluation.json").read_text())["n_nodes"] > 0


@pytest.mark.parametrize("kw", [dict(method="exact", nodes_only=True), dict(method="ig", use_ext=False),
                                dict(method="attrib", aggregation="none", top_k_nodes=5, top_k_edges=7)])
def test_find_circuit_and_sweep(tmp_path, kw):
    t = make_inputs(tmp_path, 4, same_length=True)
    model, saes, batch = load(t)
    args = dict(steps=2, node_threshold=0.05, edge_threshold=0.05, batch_size=3, progress=False, **kw)
    plain = minicirc.find_circuit(model, saes, batch, **args)
    with explicit_devices_only():
        guarded = minicirc.find_circuit(model, saes, batch, **args)
        points = minicirc.evaluation.sweep(model, saes, batch, guarded, thresholds=[0.01, 0.1], progress=False,
                                           ablation="zero")
    assert json.dumps(guarded.to_json()) == json.dumps(plain.to_json())
    assert len(points) == 2 and all(p["n_nodes"] >= 0 for p in points)


@pytest.fixture(scope="module")
def quick_cache(tmp_path_factory):
    """The quick-recipe default, trained (unguarded) into a temporary cache for this module."""
    from minicirc.experiments import default
    mp = pytest.MonkeyPatch()
    mp.setenv("MINICIRC_CACHE", str(tmp_path_factory.mktemp("cache")))
    default.get_default("quick", progress=False)
    yield
    mp.undo()


def test_demo_and_shift(quick_cache, tmp_path):
    from minicirc.experiments.demo import run_demo
    from minicirc.experiments.shift_run import run_shift
    with explicit_devices_only():
        demo = run_demo(str(tmp_path / "demo"), quick=True, progress=False)
        shifted = run_shift(str(tmp_path / "shift"), quick=True, progress=False)
    assert demo["_meta"]["full_model_faithfulness"]["simple"] == pytest.approx(1.0, abs=1e-4)
    assert 0.0 <= shifted["rows"]["oracle"]["worst_group"] <= 1.0
    assert os.path.exists(tmp_path / "shift" / "shift_report.md")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: the CUDA run is checked only where one exists")
@pytest.mark.parametrize("kw", [dict(method="ig"), dict(method="attrib", aggregation="none"),
                                dict(method="exact", nodes_only=True)])
def test_cuda_run_equals_cpu_run(tmp_path, kw):
    """find_circuit and faithfulness with the model and dictionaries on the GPU give the CPU run's effects
    (float32: same formulas, other summation orders, so equal to rounding)."""
    device = "cuda"
    t = make_inputs(tmp_path, 4, same_length=True)
    model, saes, batch = load(t)
    args = dict(steps=2, node_threshold=0.05, edge_threshold=0.05, batch_size=3, progress=False, **kw)
    want = minicirc.find_circuit(model, saes, batch, **args)
    want_faith = minicirc.faithfulness(model, saes, batch, want.kept_nodes(), positional=want.positional)
    model_d, saes_d = model.to(device), {s: d.to(device) for s, d in saes.items()}
    got = minicirc.find_circuit(model_d, saes_d, batch, **args)
    assert_same_effects(got, want, atol=1e-4, rtol=1e-4)
    got_faith = minicirc.faithfulness(model_d, saes_d, batch, want.kept_nodes(), positional=want.positional)
    for key in ("m_full", "m_empty", "m_circuit", "m_complement"):
        assert got_faith[key] == pytest.approx(want_faith[key], rel=1e-4, abs=1e-4), key
