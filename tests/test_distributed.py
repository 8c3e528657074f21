"""Data-parallel attribution: `torchrun --nproc-per-node 2 -m minicirc.cli circuit ... --distributed` (gloo on
CPU) gives every node and edge effect of the single-process run, and a failure on one rank stops all ranks."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import minicirc
from minicirc.attribution import distributed
from minicirc.data import load_examples, tokenize
from conftest import write_hf_model
from test_cli import write_data, write_tokenizer, write_tree

NOUNS = [("cat", "cats"), ("dog", "dogs")]


def random_rows(n, rng, same_length=False):
    """Agreement examples over the test tokenizer's words: subject number decides " is" / " are"."""
    rows = []
    for _ in range(n):
        a, b = rng.randrange(2), rng.randrange(2)
        plural = rng.randrange(2)
        adj = ["big"] if (same_length or rng.random() < 0.5) else []
        tail = ["near", "the", NOUNS[b][rng.randrange(2)]] if (same_length or rng.random() < 0.5) else []
        clean = ["the", *adj, NOUNS[a][plural], *tail]
        patch = ["the", *adj, NOUNS[a][1 - plural], *tail]
        ans = [" is", " are"]
        rows.append({"clean_prefix": " ".join(clean), "patch_prefix": " ".join(patch),
                     "clean_answer": ans[plural], "patch_answer": ans[1 - plural]})
    return rows


def make_inputs(t, n, same_length=False):
    seed = int(torch.randint(0, 10**6, ()).item())
    write_hf_model(t / "model", seed=seed, vocab=40)
    write_tokenizer(t / "model", 40)
    model = minicirc.load_model(t / "model")
    write_tree(t / "saes", model, seed=seed + 1)
    write_data(t / "data.jsonl", random_rows(n, random.Random(seed), same_length))
    return t


def torchrun(nproc, *args, timeout=240):
    """`torchrun --standalone` (rendezvous on a free localhost port) running the minicirc CLI."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "minicirc.cli", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MINICIRC_DIST_TIMEOUT="120")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def edge_entries(rows, vals, positional):
    """{(downstream node, [upstream position,] upstream column): value} of one (U, D) pair."""
    rows = torch.as_tensor(rows).tolist()
    out = {}
    for entry, v in zip(vals.indices().T.tolist(), vals.values().tolist()):
        out[(rows[entry[0]], *entry[1:])] = v
    return out


def file_edge_entries(tensors, u, d):
    """The same from effects.safetensors, whose rows are (position or -1, feature or -1 for the error)."""
    F_d = tensors[f"nodes.{d}.features"].shape[-1]
    rows = tensors[f"edges.{u}.{d}.rows"].tolist()
    keys = [max(t, 0) * (F_d + 1) + (F_d if i < 0 else i) for t, i in rows]
    idx, val = tensors[f"edges.{u}.{d}.indices"], tensors[f"edges.{u}.{d}.values"]
    return {(keys[e[0]], *e[1:]): v for e, v in zip(idx.T.tolist(), val.tolist())}


@pytest.mark.parametrize("aggregation,n,batch_size", [
    ("sum", 5, 2),    # 3 batches: rank 0 gets one, rank 1 two
    ("none", 3, 4),   # 1 batch: rank 1 gets none and still takes part in every reduction
])
def test_two_ranks_equal_one_process(tmp_path, aggregation, n, batch_size):
    t = make_inputs(tmp_path, n, same_length=aggregation == "none")
    flags = ["--steps", 3, "--node-threshold", 0.15, "--edge-threshold", 0.05, "--aggregation", aggregation,
             "--batch-size", batch_size]
    r = torchrun(2, "circuit", "--model", t / "model", "--saes", t / "saes", "--data", t / "data.jsonl",
                 "--out", t / "d2", "--distributed", *flags)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("nodes,") == 1        # only rank 0 reports (and writes)

    model = minicirc.load_model(t / "model")
    saes = minicirc.load_saes(t / "saes", model)
    batch = tokenize(load_examples(t / "data.jsonl"), minicirc.load_tokenizer(t / "model"))
    # One thread, like each rank: the same batches then give the same float32 rounding.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = minicirc.find_circuit(model, saes, batch, steps=3, node_threshold=0.15, edge_threshold=0.05,
                                    aggregation=aggregation, batch_size=batch_size, progress=False)
    finally:
        torch.set_num_threads(threads)

    got = load_file(t / "d2" / "effects.safetensors")
    # Every node effect, kept or not.
    for s, v in ref.nodes.items():
        torch.testing.assert_close(got[f"nodes.{s}.features"], v[..., :-1], atol=1e-6, rtol=0)
        torch.testing.assert_close(got[f"nodes.{s}.error"], v[..., -1], atol=1e-6, rtol=0)
    # Every edge effect: same downstream rows, same upstream entries, same values.
    assert sorted(k[:-len("values")] for k in got if k.startswith("edges.") and k.endswith(".values")) == \
        sorted(f"edges.{u}.{d}." for u, d in ref.edges)
    nnz = 0
    for (u, d), (keys, vals) in ref.edges.items():
        want = edge_entries(keys, vals, ref.positional)
        have = file_edge_entries(got, u, d)
        assert have.keys() == want.keys(), (u, d)
        assert max(abs(have[k] - want[k]) for k in want) <= 1e-6 if want else True
        nnz += len(want)
    assert nnz > 0, "no edges at all: the comparison would be vacuous"
    # circuit.json: same kept nodes and edges, same metric.
    data = json.loads((t / "d2" / "circuit.json").read_text())
    want = ref.to_json()
    assert [nd["id"] for nd in data["nodes"]] == [nd["id"] for nd in want["nodes"]]
    assert [nd["effect"] for nd in data["nodes"]] == pytest.approx([nd["effect"] for nd in want["nodes"]], abs=1e-6)
    assert [(e["source"], e["target"]) for e in data["edges"]] == [(e["source"], e["target"]) for e in want["edges"]]
    assert data["metric"] == pytest.approx(want["metric"], abs=1e-6)
    assert data["settings"] == json.loads(json.dumps(want["settings"]))


def test_a_failing_rank_stops_every_rank(tmp_path):
    """Rank 0 refuses to overwrite an earlier run; rank 1 must not wait forever in a collective."""
    t = make_inputs(tmp_path, 3)
    os.makedirs(t / "out")
    (t / "out" / "circuit.json").write_text("earlier")
    r = torchrun(2, "circuit", "--model", t / "model", "--saes", t / "saes", "--data", t / "data.jsonl",
                 "--out", t / "out", "--distributed", "--nodes-only", "--method", "attrib", timeout=120)
    assert r.returncode != 0
    err = r.stdout + r.stderr
    assert "earlier run" in err
    assert "rank 0 failed" in err          # what rank 1 says
    assert (t / "out" / "circuit.json").read_text() == "earlier"
    assert sorted(os.listdir(t / "out")) == ["circuit.json"]


def test_distributed_flag_needs_a_launcher(tmp_path, monkeypatch, capsys):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    from minicirc.cli import main
    code = main(["circuit", "--model", str(tmp_path / "m"), "--saes", "neurons", "--data", str(tmp_path / "d"),
                 "--out", str(tmp_path / "o"), "--distributed"])
    assert code == 2
    assert "torchrun" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_find_circuit_distributed_needs_a_process_group(tmp_path):
    model = minicirc.GPTNeoX(minicirc.Config(vocab_size=20, d_model=8, n_layers=1, n_heads=2, d_mlp=16))
    from minicirc.data import Batch
    b = Batch(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long), torch.tensor([1]),
              torch.tensor([2]), torch.tensor([1]), [None])
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(minicirc.MinicircError, match="no process group"):
        minicirc.find_circuit(model, minicirc.identity_saes(model), b, distributed=True, progress=False)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_are_contiguous_whole_batches(world):
    for n_batches in range(0, 11):
        spans = [distributed.shard(n_batches, r, world) for r in range(world)]
        assert spans[0][0] == 0 and spans[-1][1] == n_batches
        assert all(spans[r][1] == spans[r + 1][0] for r in range(world - 1))
        sizes = [hi - lo for lo, hi in spans]
        assert max(sizes) - min(sizes) <= 1


# --- the collectives, on a 3-process gloo group (file:// rendezvous) -----------------------------------

def _rank_main(rank, world, init_file, inputs, out_dir):
    import pickle
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mine = inputs[rank]
        res = {"tensors": distributed.all_reduce_sum([t.clone() for t in mine["tensors"]]),
               "empty": distributed.all_reduce_sum([]),
               "sparse": distributed.all_gather_sparse(mine["parts"])}
        try:
            distributed.agree(mine["error"], rank)
            res["agree"] = None
        except Exception as e:
            res["agree"] = (type(e).__name__, str(e))
        # summed_over_ranks: reduce after a loop that ran everywhere; if rank 1 fails inside it, every rank
        # raises and none reduces.
        class Sums:
            reduced = False

            def reduce(self, group):
                self.reduced = True
        for fail in (False, True):
            sums = Sums()
            try:
                with distributed.summed_over_ranks(sums):
                    if fail and rank == 1:
                        raise ValueError("inside the loop")
                res[f"summed {fail}"] = ("ok", sums.reduced)
            except Exception as e:
                res[f"summed {fail}"] = (type(e).__name__, str(e), sums.reduced)
        with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
            pickle.dump(res, f)
    finally:
        dist.destroy_process_group()


def test_collectives_on_three_ranks(tmp_path):
    import pickle
    import torch.multiprocessing as mp
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ()).item()))
    world = 3
    # float64 values a float32 round trip would change; ranks hold different numbers of sparse entries (none on 1).
    nnz = [[3, 0, 2], [], [int(torch.randint(4, 9, (), generator=g))]]
    inputs = []
    for r in range(world):
        tensors = [torch.randn(3, 4, generator=g), 1.0 + 1e-9 * torch.randn(5, generator=g, dtype=torch.float64),
                   torch.randn(2, generator=g, dtype=torch.float64)]
        parts = [((f"site{r}", f"down{i}"), [(r, i), (None, "err")], torch.randint(0, 1000, (n,), generator=g),
                  torch.randn(n, generator=g, dtype=torch.float64), (7, r + 1)) for i, n in enumerate(nnz[r])]
        error = [None, ValueError("bad shard"), minicirc.MinicircError("nan here")][r]
        inputs.append({"tensors": tensors, "parts": parts, "error": error})
    mp.spawn(_rank_main, args=(world, str(tmp_path / "rdzv"), inputs, str(tmp_path)), nprocs=world, join=True)
    want_sums = []
    for i in range(3):
        total = torch.zeros(inputs[0]["tensors"][i].shape, dtype=torch.float64)
        for r in range(world):
            total += inputs[r]["tensors"][i].double()
        want_sums.append(total)
    for r in range(world):
        res = pickle.loads((tmp_path / f"{r}.pkl").read_bytes())
        assert res["empty"] == []
        for got, want, orig in zip(res["tensors"], want_sums, inputs[r]["tensors"]):
            assert got.dtype == orig.dtype and got.shape == orig.shape
            torch.testing.assert_close(got, want.to(orig.dtype), rtol=0, atol=1e-6 if orig.dtype == torch.float32 else 1e-15)
        # Every rank receives every rank's entries, in rank order, exactly.
        assert len(res["sparse"]) == world
        for src in range(world):
            got, want = res["sparse"][src], inputs[src]["parts"]
            assert len(got) == len(want)
            for (gp, gk, gl, gv, grest), (wp, wk, wl, wv, wrest) in zip(got, want):
                assert (gp, gk, grest) == (wp, wk, wrest)
                assert torch.equal(gl, wl) and torch.equal(gv, wv) and gv.dtype == torch.float64
        # The failing ranks raise their own error; the others name the first failing rank.
        assert res["agree"] == [("MinicircError", "rank 1 failed: ValueError: bad shard"),
                                ("ValueError", "bad shard"), ("MinicircError", "nan here")][r]
        assert res["summed False"] == ("ok", True)
        assert res["summed True"] == (("ValueError", "inside the loop", False) if r == 1 else
                                      ("MinicircError", "rank 1 failed: ValueError: inside the loop", False))


def test_launched_needs_every_variable(monkeypatch):
    keys = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    for k in keys:
        monkeypatch.setenv(k, "1")
    assert distributed.launched()
    for k in keys:
        monkeypatch.delenv(k)
        assert not distributed.launched(), k
        monkeypatch.setenv(k, "1")
