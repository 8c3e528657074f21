"""The pure-torch GPT-NeoX against transformers, and the site mechanism."""
import json
import os

import pytest
import torch

import minicirc
from minicirc.errors import MinicircError
from minicirc.model import check_tokens
from conftest import write_hf_model


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
@pytest.mark.parametrize("seed", [1, 2])
def test_logits_match_transformers(tmp_path, parallel, rotary_pct, seed):
    hf = write_hf_model(tmp_path, seed=seed, parallel=parallel, rotary_pct=rotary_pct, tie=(seed == 2))
    model = minicirc.load_model(tmp_path)
    tokens = torch.randint(0, 61, (3, 13), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = model(tokens)
    assert got.shape == (3, 13, 61)
    assert (got - expected).abs().max().item() <= 1e-5


def test_pytorch_model_bin_loads_like_safetensors(tmp_path):
    from safetensors.torch import load_file
    write_hf_model(tmp_path / "st", seed=3)
    # Older transformers wrote pytorch_model.bin: the same tensors, pickled (weights only).
    os.makedirs(tmp_path / "bin")
    torch.save(load_file(tmp_path / "st" / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    a, b = minicirc.load_model(tmp_path / "st"), minicirc.load_model(tmp_path / "bin")
    tokens = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        assert torch.equal(a(tokens), b(tokens))


def test_parallel_and_sequential_differ(tmp_path):
    write_hf_model(tmp_path, seed=4, parallel=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    par = minicirc.load_model(tmp_path)
    cfg["use_parallel_residual"] = False
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    seq = minicirc.load_model(tmp_path)
    tokens = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        assert (par(tokens) - seq(tokens)).abs().max() > 1e-3


def test_save_model_roundtrip(tiny_model_dir, tmp_path):
    model = minicirc.load_model(tiny_model_dir)
    minicirc.save_model(model, tmp_path / "copy")
    again = minicirc.load_model(tmp_path / "copy")
    tokens = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(tokens), again(tokens))


def test_reading_and_self_replacement_leave_logits_unchanged(tiny_model_dir):
    model = minicirc.load_model(tiny_model_dir)
    tokens = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        ref = model(tokens)
        cache = {}
        read = model(tokens, cache=cache)
        same = model(tokens, edit={s: (lambda x: x.clone()) for s in model.sites})
    assert set(cache) == set(model.sites)
    assert torch.equal(read, ref) and torch.equal(same, ref)
    for s, v in cache.items():
        assert v.shape == (2, 10, model.cfg.d_model), s
    # The residual identity holds site by site (parallel residual): resid_l = resid_{l-1} + attn_l + mlp_l.
    prev = cache["embed"]
    for l in range(model.cfg.n_layers):
        assert torch.allclose(cache[f"resid_{l}"], prev + cache[f"attn_{l}"] + cache[f"mlp_{l}"], atol=1e-6)
        prev = cache[f"resid_{l}"]


def test_replacement_changes_only_downstream(tiny_model_dir):
    model = minicirc.load_model(tiny_model_dir)
    tokens = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        clean = {}
        model(tokens, cache=clean)
        edited = {}
        noise = torch.randn(2, 10, model.cfg.d_model)
        model(tokens, edit={"mlp_0": lambda x: x + noise}, cache=edited)
    order = model.sites
    i = order.index("mlp_0")
    for s in order[:i]:
        assert torch.equal(clean[s], edited[s]), f"{s} is upstream of mlp_0 and must not change"
    assert torch.allclose(edited["mlp_0"], clean["mlp_0"] + noise)
    for s in order[i + 1:]:
        assert (clean[s] - edited[s]).abs().max() > 1e-4, f"{s} is downstream of mlp_0 and must change"
    # Causality: editing only the last position changes nothing at earlier positions.
    with torch.no_grad():
        late = {}
        bump = torch.zeros(2, 10, model.cfg.d_model)
        bump[:, -1] = torch.randn(2, model.cfg.d_model)
        model(tokens, edit={"embed": lambda x: x + bump}, cache=late)
    assert torch.allclose(late["resid_1"][:, :-1], clean["resid_1"][:, :-1], atol=1e-6)


def test_stop_at_returns_early(tiny_model_dir):
    model = minicirc.load_model(tiny_model_dir)
    cache = {}
    with torch.no_grad():
        assert model(torch.randint(0, 61, (1, 4)), cache=cache, stop_at="attn_1") is None
    assert "attn_1" in cache and "mlp_1" not in cache


# --- bad input ---------------------------------------------------------------------------------------

def test_missing_checkpoint_files(tmp_path, tiny_model_dir):
    with pytest.raises(MinicircError, match="does not exist"):
        minicirc.load_model(tmp_path / "nope")
    os.remove(tiny_model_dir / "model.safetensors")
    with pytest.raises(MinicircError, match="no model.safetensors or pytorch_model.bin"):
        minicirc.load_model(tiny_model_dir)
    os.remove(tiny_model_dir / "config.json")
    with pytest.raises(MinicircError, match="config.json is missing"):
        minicirc.load_model(tiny_model_dir)


def test_corrupt_checkpoint(tiny_model_dir):
    path = tiny_model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MinicircError, match="cannot read safetensors"):
        minicirc.load_model(tiny_model_dir)


def test_pickle_with_code_is_refused(tiny_model_dir):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))
    os.remove(tiny_model_dir / "model.safetensors")
    torch.save({"x": Evil()}, tiny_model_dir / "pytorch_model.bin")
    with pytest.raises(MinicircError, match="weights_only"):
        minicirc.load_model(tiny_model_dir)


def test_unsupported_config_fields(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    for change, msg in [({"hidden_act": "swish"}, "hidden_act"), ({"model_type": "t5"}, "model_type 't5' is not supported"),
                        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope type")]:
        (tiny_model_dir / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(MinicircError, match=msg):
            minicirc.load_model(tiny_model_dir)


def test_nan_in_weights(tiny_model_dir):
    from safetensors.torch import load_file, save_file
    state = load_file(tiny_model_dir / "model.safetensors")
    state["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"][0, 0] = float("nan")
    save_file(state, tiny_model_dir / "model.safetensors")
    with pytest.raises(MinicircError, match="NaN"):
        minicirc.load_model(tiny_model_dir)


def test_width_mismatch_in_checkpoint(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg["intermediate_size"] = 50
    (tiny_model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MinicircError, match="shape"):
        minicirc.load_model(tiny_model_dir)


def test_bad_tokens_and_sites(tiny_model_dir):
    model = minicirc.load_model(tiny_model_dir)
    # Token ids are checked where they enter (tokenize, the commands), not on every forward call.
    with pytest.raises(MinicircError, match="token id 61 is out of the vocabulary"):
        check_tokens(torch.tensor([[1, 2, 61]]), model.cfg.vocab_size)
    check_tokens(torch.tensor([[0, 2, 60]]), model.cfg.vocab_size)
    with pytest.raises(MinicircError, match="unknown site"):
        model(torch.tensor([[1, 2]]), edit={"resid_7": lambda x: x})
    with pytest.raises(MinicircError, match="shape"):
        model(torch.tensor([1, 2]))


def test_tokenizer_missing_is_clear(tiny_model_dir):
    with pytest.raises(MinicircError, match="tokenizer.json"):
        minicirc.load_tokenizer(tiny_model_dir)


# --- config.json variants, checked against transformers loading the same directory --------------------

def write_variant(path, seed, config_edit, **cfg_kw):
    """A random GPT-NeoX saved by transformers, then its config.json edited by `config_edit(dict)`;
    returns transformers' model loaded back from that directory (the reference)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(seed)
    kw = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              max_position_embeddings=64)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(**{**kw, **cfg_kw})).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    config_edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    return GPTNeoXForCausalLM.from_pretrained(path).eval()


def _v4_keys(cfg):   # transformers 4 wrote rotary_pct / rotary_emb_base and no rope_parameters
    rope = cfg.pop("rope_parameters")
    cfg["rotary_pct"], cfg["rotary_emb_base"] = rope["partial_rotary_factor"], rope["rope_theta"]


def _no_rotary_keys(cfg):   # neither spelling: transformers' defaults (rotary_pct 0.25, base 10000) apply
    cfg.pop("rope_parameters")


@pytest.mark.parametrize("variant,edit,kw", [
    ("v5 rope_parameters", lambda c: None, dict(rope_parameters={"rope_type": "default", "rope_theta": 300.0,
                                                                   "partial_rotary_factor": 0.5})),
    ("v4 rotary_pct/rotary_emb_base", _v4_keys, dict(rope_parameters={"rope_type": "default", "rope_theta": 300.0,
                                                                       "partial_rotary_factor": 0.5})),
    ("no rotary keys", _no_rotary_keys, dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                               "partial_rotary_factor": 0.25})),
    ("fractional rotary dim", lambda c: None, dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                     "partial_rotary_factor": 0.3})),
    ("odd rotary dim", lambda c: None, dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                              "partial_rotary_factor": 0.375})),
    ("eps, gelu_new, no attention bias, sequential", lambda c: None,
     dict(layer_norm_eps=0.3, hidden_act="gelu_new", attention_bias=False, use_parallel_residual=False)),
])
def test_config_variants_match_transformers(tmp_path, variant, edit, kw):
    seed = int(torch.randint(0, 10**6, ()).item())
    hf = write_variant(tmp_path, seed, edit, **kw)
    model = minicirc.load_model(tmp_path)
    tokens = torch.randint(0, 61, (2, 17))
    with torch.no_grad():
        expected, got = hf(tokens).logits, model(tokens)
    assert (got - expected).abs().max().item() <= 1e-5, variant


def test_saved_config_reads_back_in_transformers(tmp_path):
    """save_model writes a config.json that transformers reads as the same model (non-default settings)."""
    from transformers import GPTNeoXForCausalLM
    seed = int(torch.randint(0, 10**6, ()).item())
    write_variant(tmp_path / "src", seed, lambda c: None, layer_norm_eps=0.2, use_parallel_residual=False,
                  tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 300.0, "partial_rotary_factor": 0.5})
    model = minicirc.load_model(tmp_path / "src")
    minicirc.save_model(model, tmp_path / "out")
    hf = GPTNeoXForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert hf.config.tie_word_embeddings and not hf.config.use_parallel_residual
    tokens = torch.randint(0, 61, (2, 15))
    again = minicirc.load_model(tmp_path / "out")    # and minicirc reads its own file the same way
    with torch.no_grad():
        expected = hf(tokens).logits
        assert (expected - model(tokens)).abs().max().item() <= 1e-5
        assert (expected - again(tokens)).abs().max().item() <= 1e-5


def test_stop_at_every_site(tiny_model_dir):
    """stop_at=s fills the cache with exactly the sites computed up to s (same values as a full run)."""
    model = minicirc.load_model(tiny_model_dir)
    order = ["embed"] + [f"{k}_{l}" for l in range(model.cfg.n_layers) for k in ("attn", "mlp", "resid")]
    assert model.sites == order
    tokens = torch.randint(0, 61, (2, 6))
    full = {}
    with torch.no_grad():
        model(tokens, cache=full)
        for i, s in enumerate(order):
            cache = {}
            assert model(tokens, cache=cache, stop_at=s) is None, s
            assert list(cache) == order[:i + 1], s
            for k in cache:
                assert torch.equal(cache[k], full[k]), (s, k)
    with pytest.raises(MinicircError, match="unknown site"):
        model(tokens, stop_at="resid_2")


def test_token_and_length_limits(tiny_model_dir):
    model = minicirc.load_model(tiny_model_dir)
    from transformers import GPTNeoXForCausalLM
    hf = GPTNeoXForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokens = torch.randint(0, 61, (1, 64))          # exactly max_position_embeddings: allowed
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() <= 1e-5
    with pytest.raises(MinicircError, match="exceeds max_position_embeddings 64"):
        model(torch.randint(0, 61, (1, 65)))
    with pytest.raises(MinicircError, match="token id -1 is out of the vocabulary"):
        check_tokens(torch.tensor([[3, -1, 2]]), model.cfg.vocab_size)


def test_malformed_configs_and_checkpoints(tiny_model_dir):
    from safetensors.torch import load_file, save_file
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    for change, msg in [({"hidden_size": 30}, "not divisible"),
                        ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type")]:
        (tiny_model_dir / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(MinicircError, match=msg):
            minicirc.load_model(tiny_model_dir)
    (tiny_model_dir / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "vocab_size"}))
    with pytest.raises(MinicircError, match="required field 'vocab_size'"):
        minicirc.load_model(tiny_model_dir)
    (tiny_model_dir / "config.json").write_text(json.dumps(cfg))
    state = load_file(tiny_model_dir / "model.safetensors")
    del state["gpt_neox.layers.1.attention.dense.bias"]
    save_file(state, tiny_model_dir / "model.safetensors")
    with pytest.raises(MinicircError, match="lacks 1 tensors"):
        minicirc.load_model(tiny_model_dir)


def test_model_hash_sees_every_weight(tiny_model_dir):
    from minicirc.model import model_hash
    model = minicirc.load_model(tiny_model_dir)
    base = model_hash(model)
    assert model_hash(minicirc.load_model(tiny_model_dir)) == base
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ()).item()))
    for name, p in model.named_parameters():
        i = int(torch.randint(0, p.numel(), (), generator=g))
        with torch.no_grad():
            old = p.view(-1)[i].item()
            p.view(-1)[i] += 0.5
            assert model_hash(model) != base, name
            p.view(-1)[i] = old
    assert model_hash(model) == base
