"""Hugging Face Hub ids as --model / --saes and in the Python loaders (minicirc.hub), read from a hub cache
the tests build on disk in huggingface_hub's layout (models--owner--repo/snapshots/<commit>/..., refs/main),
with HF_HUB_OFFLINE=1: nothing is downloaded. huggingface_hub reads its environment when imported, so the
runs that use the cache are fresh processes.

References: the same files read from their local paths (model and dictionary hashes, the circuit the
command finds); the error cases by their one-line messages.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

import minicirc
from minicirc.hub import split_id
from minicirc.model import model_hash
from minicirc.sae import saes_hash
from conftest import write_hf_model
from test_cli import ROWS, write_data, write_tokenizer, write_tree

COMMIT = "0123456789abcdef0123456789abcdef01234567"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cache_repo(cache, repo, source):
    """Put the folder `source` into the hub cache as repository `repo` at COMMIT, refs/main naming it."""
    base = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(source, base / "snapshots" / COMMIT)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(COMMIT)


@pytest.fixture
def hub_cache(tmp_path):
    """A model repository org/tiny-model and a dictionary repository org/tiny-saes holding the tree under
    dicts/ (and another folder beside it), as the local folders they were made from."""
    local = tmp_path / "local"
    write_hf_model(local / "model", seed=3, vocab=40)
    write_tokenizer(local / "model", 40)
    model = minicirc.load_model(local / "model")
    write_tree(local / "saes" / "dicts", model, seed=5)
    shutil.copytree(local / "saes" / "dicts", local / "saes" / "other")
    cache = tmp_path / "cache"
    cache_repo(cache, "org/tiny-model", local / "model")
    cache_repo(cache, "org/tiny-saes", local / "saes")
    write_data(tmp_path / "data.jsonl", ROWS)
    return tmp_path


def run_offline(tmp_path, args):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "home"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


LOADERS = """
import json, sys, minicirc
from minicirc.model import model_hash
from minicirc.sae import saes_hash
model = minicirc.load_model("org/tiny-model")
tok = minicirc.load_tokenizer("org/tiny-model")
saes = minicirc.load_saes("org/tiny-saes/dicts", model)
one = minicirc.load_sae("org/tiny-saes/dicts/resid_out_layer0")
errors = {}
for name, call in [("missing repo", lambda: minicirc.load_model("org/missing")),
                   ("missing folder", lambda: minicirc.load_saes("org/tiny-saes/nothing-here", model))]:
    try:
        call()
    except minicirc.MinicircError as e:
        errors[name] = str(e)
print(json.dumps({"model": model_hash(model), "saes": saes_hash(saes), "vocab": tok.get_vocab_size(),
                  "one": float(one.W_enc.sum()), "errors": errors}))
"""


def test_hub_ids_read_from_the_cache_offline(hub_cache):
    t = hub_cache
    out = run_offline(t, ["-c", LOADERS])
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    model = minicirc.load_model(t / "local" / "model")
    assert got["model"] == model_hash(model)
    assert got["saes"] == saes_hash(minicirc.load_saes(t / "local" / "saes" / "dicts", model))
    assert got["vocab"] == 40
    assert got["one"] == pytest.approx(float(minicirc.load_sae(t / "local" / "saes" / "dicts" / "resid_out_layer0").W_enc.sum()))
    missing = got["errors"]["missing repo"]
    assert "org/missing: no such file or folder" in missing and "not in the cache" in missing
    assert "HF_HUB_OFFLINE" in missing and "hf download org/missing" in missing and "\n" not in missing
    folder = got["errors"]["missing folder"]
    assert "org/tiny-saes has no file or folder nothing-here in the cache" in folder and "\n" not in folder


def test_cli_takes_hub_ids_for_model_and_saes(hub_cache):
    """`minicirc circuit --model org/repo --saes org/repo/folder` offline from the cache finds the circuit the
    local paths give; a hub id that is not cached ends in one line naming what to download."""
    t = hub_cache
    settings = ["--data", "data.jsonl", "--method", "attrib", "--node-threshold", "0.01", "--edge-threshold", "0.001"]
    out = run_offline(t, ["-m", "minicirc", "circuit", "--model", "org/tiny-model", "--saes", "org/tiny-saes/dicts",
                          "--out", "hub_out", *settings])
    assert out.returncode == 0, out.stderr
    # The local paths in a process like the hub run's (one OpenMP thread, a fresh interpreter): bit-equal runs,
    # whatever an earlier test in this process left behind.
    local = run_offline(t, ["-m", "minicirc", "circuit", "--model", str(t / "local" / "model"),
                            "--saes", str(t / "local" / "saes" / "dicts"), "--out", "local_out", *settings])
    assert local.returncode == 0, local.stderr
    hub_run, local_run = (json.loads((t / d / "circuit.json").read_text()) for d in ("hub_out", "local_out"))
    assert hub_run["nodes"] and hub_run["nodes"] == local_run["nodes"] and hub_run["edges"] == local_run["edges"]
    bad = run_offline(t, ["-m", "minicirc", "circuit", "--model", "org/tiny-model", "--saes", "org/no-saes/dicts",
                          "--out", "bad_out", *settings])
    assert bad.returncode == 2
    line = bad.stderr.strip().splitlines()
    assert len(line) == 1 and "org/no-saes/dicts" in line[0] and "hf download org/no-saes --include 'dicts/*'" in line[0]
    assert not (t / "bad_out").exists()


def test_without_huggingface_hub_an_id_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)     # import huggingface_hub now fails
    for load in (minicirc.load_model, minicirc.load_tokenizer, lambda p: minicirc.load_saes(p, None), minicirc.load_sae):
        with pytest.raises(minicirc.MinicircError, match=r"^org/repo/sub: no such file or folder; to read it as a "
                                                         r"Hugging Face Hub id, install huggingface_hub"):
            load("org/repo/sub")
    # A local path that exists is read as such, id-shaped or not; one that cannot be an id keeps its error.
    write_hf_model(tmp_path / "org" / "repo", seed=1)
    monkeypatch.chdir(tmp_path)
    assert minicirc.load_model("org/repo").cfg.d_model == 32
    with pytest.raises(minicirc.MinicircError, match="model directory /no/such/model does not exist"):
        minicirc.load_model("/no/such/model")
    with pytest.raises(minicirc.MinicircError, match="SAE directory ./saes does not exist"):
        minicirc.load_saes("./saes", None)


@pytest.mark.parametrize("text, parts", [
    ("org/repo", ("org/repo", "")), ("org/repo/a/b", ("org/repo", "a/b")), ("EleutherAI/pythia-70m-deduped", ("EleutherAI/pythia-70m-deduped", "")),
    ("org/repo/model.gguf", ("org/repo", "model.gguf")), ("org/repo/dicts/", ("org/repo", "dicts")),
    ("/abs/path", None), ("./org/repo", None), ("../org/repo", None), ("repo", None), ("org/../x", None), ("org//x", None)])
def test_split_id(text, parts):
    assert split_id(text) == parts
