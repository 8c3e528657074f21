"""GPT-2, Llama, Qwen2, Qwen3 and Gemma-2 against transformers on tiny random checkpoints it writes itself,
and the site mechanism on every family."""
import json
import os

import pytest
import torch

import minicirc
from minicirc.errors import MinicircError

V = 67  # vocabulary of every tiny model


def write_hf(path, kind, seed=0, **kw):
    """A random transformers model of family `kind` saved to `path` (weights perturbed so that norms are not
    all ones and biases not zero); returns transformers' model read back from that folder, eager attention."""
    import transformers as tf
    classes = {"gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel), "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
               "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
               "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM)}
    config_cls, model_cls = classes[kind]
    if kind == "gpt2":
        base = dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    else:
        base = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(seed)
    hf = model_cls(config_cls(**{**base, **kw})).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(path)
    return model_cls.from_pretrained(path, attn_implementation="eager").eval()


LLAMA3 = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

CASES = {
    "gpt2": ("gpt2", {}),
    "gpt2 gelu, eps": ("gpt2", dict(activation_function="gelu", layer_norm_epsilon=0.3, n_inner=40)),
    "llama llama3-rope gqa untied": ("llama", dict(rope_parameters=LLAMA3, tie_word_embeddings=False)),
    "llama llama3-rope gqa tied": ("llama", dict(rope_parameters=LLAMA3, tie_word_embeddings=True)),
    "llama mha biases": ("llama", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True, rms_norm_eps=0.1,
                                       rope_parameters={"rope_type": "default", "rope_theta": 100.0})),
    "qwen2 biases": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen3 qk-norm head_dim": ("qwen3", dict(head_dim=12, tie_word_embeddings=True)),
    "gemma2 softcaps window": ("gemma2", dict(head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=3.0,
                                              final_logit_softcapping=2.0, sliding_window=5,
                                              layer_types=["sliding_attention", "full_attention"])),
}


def _logit_gap(case, tmp_path, T=17):
    kind, kw = CASES[case]
    hf = write_hf(tmp_path, kind, seed=sum(map(ord, case)), **kw)
    model = minicirc.load_model(tmp_path)
    tokens = torch.randint(0, V, (3, T))
    with torch.no_grad():
        expected, got = hf(tokens).logits, model(tokens)
    assert got.shape == expected.shape == (3, T, V)
    return (got - expected).abs().max().item(), expected.abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    gap, scale = _logit_gap(case, tmp_path)
    assert scale > 0.1                                    # the logits are not trivially small
    assert gap <= 1e-5, (case, gap)


def test_gemma2_softcaps_and_window_matter(tmp_path):
    """The Gemma-2 case exercises what it claims: switching off either cap or the window changes the logits."""
    write_hf(tmp_path, "gemma2", seed=5, **CASES["gemma2 softcaps window"][1])
    ref = minicirc.load_model(tmp_path)
    tokens = torch.randint(0, V, (2, 17))
    with torch.no_grad():
        base = ref(tokens)
        assert base.abs().max() <= 2.0 + 1e-6            # final soft-cap 2.0
        for field in ("attn_softcap", "final_softcap", "sliding_window"):
            model = minicirc.load_model(tmp_path)
            setattr(model.cfg, field, None)
            for layer in model.layers:
                layer.self_attn.window = model.cfg.sliding_window if layer.self_attn.window else None
            assert (model(tokens) - base).abs().max() > 1e-3, field


def test_gpt2_keys_without_prefix(tmp_path):
    """GPT-2 checkpoints as GPT2Model writes them (no `transformer.` prefix, no lm_head): same logits."""
    from safetensors.torch import load_file, save_file
    hf = write_hf(tmp_path, "gpt2", seed=3)
    state = load_file(tmp_path / "model.safetensors")
    assert any(k.startswith("transformer.") for k in state)
    stripped = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
    save_file(stripped, tmp_path / "model.safetensors")
    model = minicirc.load_model(tmp_path)
    tokens = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() <= 1e-5


def test_sharded_checkpoint(tmp_path):
    import transformers as tf
    hf = write_hf(tmp_path / "one", "llama", seed=4)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = [f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]
    assert len(shards) > 2 and os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    model = minicirc.load_model(tmp_path / "sharded")
    again = tf.LlamaForCausalLM.from_pretrained(tmp_path / "sharded", attn_implementation="eager").eval()
    tokens = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        assert (model(tokens) - again(tokens).logits).abs().max().item() <= 1e-5
    os.remove(tmp_path / "sharded" / sorted(shards)[1])
    with pytest.raises(MinicircError, match=f"names 1 shard files that are not there, e.g. {sorted(shards)[1]}"):
        minicirc.load_model(tmp_path / "sharded")


def test_sharded_pytorch_bin_checkpoint(tmp_path):
    """Older sharded checkpoints: pytorch_model-0000N-of-0000M.bin files named by pytorch_model.bin.index.json."""
    from safetensors.torch import load_file
    hf = write_hf(tmp_path, "qwen2", seed=15)
    state = load_file(tmp_path / "model.safetensors")
    os.remove(tmp_path / "model.safetensors")
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        f = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: state[k] for k in part}, tmp_path / f)
        weight_map.update({k: f for k in part})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = minicirc.load_model(tmp_path)
    tokens = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma2"])
def test_save_model_roundtrip(tmp_path, kind):
    import transformers as tf
    write_hf(tmp_path / "src", kind, seed=6, **({"sliding_window": 4} if kind == "gemma2" else {}))
    model = minicirc.load_model(tmp_path / "src")
    minicirc.save_model(model, tmp_path / "out")
    again = minicirc.load_model(tmp_path / "out")
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    tokens = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(tokens), again(tokens))
        assert (model(tokens) - hf(tokens).logits).abs().max().item() <= 1e-5


# --- sites ---------------------------------------------------------------------------------------------

SITE_CASES = ["gpt2", "llama llama3-rope gqa tied", "qwen2 biases", "qwen3 qk-norm head_dim", "gemma2 softcaps window"]


@pytest.mark.parametrize("case", SITE_CASES)
def test_sites_read_and_replace(tmp_path, case):
    """Reading every site and replacing each by itself leaves the logits unchanged; replacing one site by
    another value changes it and everything downstream of it, and nothing upstream."""
    kind, kw = CASES[case]
    write_hf(tmp_path, kind, seed=7, **kw)
    model = minicirc.load_model(tmp_path)
    assert model.sites == ["embed"] + [f"{k}_{l}" for l in range(2) for k in ("attn", "mlp", "resid")]
    tokens = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        ref = model(tokens)
        clean = {}
        read = model(tokens, cache=clean)
        same = model(tokens, edit={s: (lambda x: x.clone()) for s in model.sites})
    assert torch.equal(read, ref) and torch.equal(same, ref)
    assert list(clean) == model.sites
    prev = clean["embed"]
    for l in range(model.cfg.n_layers):   # what the sites mean: resid_l = resid_{l-1} + attn_l + mlp_l
        assert torch.allclose(clean[f"resid_{l}"], prev + clean[f"attn_{l}"] + clean[f"mlp_{l}"], atol=1e-6)
        prev = clean[f"resid_{l}"]
    assert torch.equal(model.unembed(clean["resid_1"]), ref)
    order = model.sites
    for target in ("embed", "attn_0", "mlp_0", "attn_1"):
        noise = torch.randn(2, 10, model.cfg.d_model)
        edited = {}
        with torch.no_grad():
            out = model(tokens, edit={target: lambda x: x + noise}, cache=edited)
        i = order.index(target)
        for s in order[:i]:
            assert torch.equal(clean[s], edited[s]), f"{s} is upstream of {target} and must not change"
        assert torch.allclose(edited[target], clean[target] + noise)
        for s in order[i + 1:]:
            assert (clean[s] - edited[s]).abs().max() > 1e-4, f"{s} is downstream of {target} and must change"
        assert (out - ref).abs().max() > 1e-4


@pytest.mark.parametrize("case", ["llama llama3-rope gqa tied", "gemma2 softcaps window"])
def test_logit_diff_and_unembed_match_full_logits(tmp_path, case):
    """The metric's shortcut (two answer logits only) equals the difference of the full logits, soft-cap included."""
    kind, kw = CASES[case]
    write_hf(tmp_path, kind, seed=8, **kw)
    model = minicirc.load_model(tmp_path)
    tokens = torch.randint(0, V, (4, 8))
    a, b = torch.randint(0, V, (4,)), torch.randint(0, V, (4,))
    with torch.no_grad():
        cache = {}
        logits = model(tokens, cache=cache)[:, -1]
        h = cache["resid_1"][:, -1]
        rows = torch.arange(4)
        assert torch.allclose(model.unembed(h, a), logits[rows, a], atol=1e-6)
        assert torch.allclose(model.logit_diff(h, a, b), logits[rows, a] - logits[rows, b], atol=1e-6)


# --- bad configs -----------------------------------------------------------------------------------------

def test_unsupported_config_features_are_named(tmp_path):
    write_hf(tmp_path, "llama", seed=9)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for change, msg in [({"model_type": "mixtral"}, "model_type 'mixtral' is not supported"),
                        ({"num_local_experts": 8}, "num_local_experts = 8: mixture of experts"),
                        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope type 'yarn'"),
                        ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
                        ({"hidden_act": "relu2"}, "hidden_act 'relu2'"),
                        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
                        ({"pretraining_tp": 2}, "pretraining_tp")]:
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(MinicircError, match=msg):
            minicirc.load_model(tmp_path)
    rope = {k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "rope_parameters": rope}))
    with pytest.raises(MinicircError, match="llama3 rope scaling lacks 'low_freq_factor'"):
        minicirc.load_model(tmp_path)


def test_older_rope_spelling(tmp_path):
    """Configs from before transformers 5: rope_theta at the top level and llama3 settings in rope_scaling."""
    hf = write_hf(tmp_path, "llama", seed=10, rope_parameters=LLAMA3)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = minicirc.load_model(tmp_path)
    tokens = torch.randint(0, V, (2, 30))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() <= 1e-5


# --- the circuit command on every family -------------------------------------------------------------

def _reference_metric(hf, batch, tokens):
    """Mean over examples of logit(patch answer) - logit(clean answer) at the last real token, by transformers."""
    with torch.no_grad():
        logits = hf(tokens).logits[torch.arange(tokens.shape[0]), batch.last]
    rows = torch.arange(tokens.shape[0])
    return (logits[rows, batch.patch_answer] - logits[rows, batch.clean_answer]).mean().item()


@pytest.mark.parametrize("case", ["gpt2", "llama llama3-rope gqa untied", "gemma2 softcaps window"])
def test_circuit_command_on_each_family(tmp_path, case):
    """`minicirc circuit --model DIR --saes neurons` runs on each family (integrated gradients and edges),
    and the metric it records is transformers' logit difference on the same examples."""
    from minicirc.cli import main
    from minicirc.data import load_examples, tokenize
    from test_cli import ROWS, write_data, write_tokenizer
    kind, kw = CASES[case]
    hf = write_hf(tmp_path / "model", kind, seed=11, **kw)
    write_tokenizer(tmp_path / "model", V)
    write_data(tmp_path / "data.jsonl", ROWS)
    assert main(["circuit", "--model", str(tmp_path / "model"), "--saes", "neurons", "--data",
                 str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "out"), "--steps", "3",
                 "--node-threshold", "0.01", "--edge-threshold", "0.001"]) == 0
    data = json.loads((tmp_path / "out" / "circuit.json").read_text())
    assert data["sites"] == minicirc.load_model(tmp_path / "model").sites and data["nodes"] and data["edges"]
    batch = tokenize(load_examples(tmp_path / "data.jsonl"), minicirc.load_tokenizer(tmp_path / "model"))
    assert data["metric"]["clean"] == pytest.approx(_reference_metric(hf, batch, batch.clean), abs=1e-5)
    assert data["metric"]["patch"] == pytest.approx(_reference_metric(hf, batch, batch.patch), abs=1e-5)


def _saelens_run(tmp_path, case, hooks, extra_args=()):
    """A tiny transformers model of `case`, SAELens folders for `hooks` (placed by their hook names), and
    `minicirc circuit` on them (its metric checked against transformers'); returns (circuit.json data, the
    --model --saes --data arguments)."""
    from minicirc.cli import main
    from minicirc.data import load_examples, tokenize
    from test_cli import ROWS, write_data, write_tokenizer
    from minicirc.sae import saes_hash
    from test_sae_files import NO_FOLD, tiny_saes_for
    kind, kw = CASES[case]
    hf = write_hf(tmp_path / "model", kind, seed=15, **kw)
    write_tokenizer(tmp_path / "model", V)
    write_data(tmp_path / "data.jsonl", ROWS)
    model = minicirc.load_model(tmp_path / "model")
    tiny_saes_for(model, hooks, tmp_path / "saes", seed_shift=0.3, metadata=NO_FOLD)
    common = ["--model", str(tmp_path / "model"), "--saes", str(tmp_path / "saes"), "--data", str(tmp_path / "data.jsonl")]
    assert main(["circuit", *common, "--out", str(tmp_path / "out"), "--steps", "3", "--node-threshold", "0.01",
                 "--edge-threshold", "0.001", *extra_args]) == 0
    data = json.loads((tmp_path / "out" / "circuit.json").read_text())
    assert data["settings"]["saes"] == saes_hash(minicirc.load_saes(tmp_path / "saes", model))
    batch = tokenize(load_examples(tmp_path / "data.jsonl"), minicirc.load_tokenizer(tmp_path / "model"))
    assert data["metric"]["clean"] == pytest.approx(_reference_metric(hf, batch, batch.clean), abs=1e-5)
    assert data["metric"]["patch"] == pytest.approx(_reference_metric(hf, batch, batch.patch), abs=1e-5)
    return data, common


@pytest.mark.parametrize("case", ["gpt2", "llama llama3-rope gqa untied", "gemma2 softcaps window"])
def test_circuit_command_with_saelens_saes_on_each_family(tmp_path, case):
    """`minicirc circuit --saes DIR` with one SAELens folder per resid hook (blocks.0.hook_resid_pre is embed)
    finds a circuit on each family: feature nodes, edges between them, transformers' logit difference."""
    hooks = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    data, _ = _saelens_run(tmp_path, case, hooks)
    assert data["sites"] == ["embed", "resid_0", "resid_1"]
    assert {n["site"] for n in data["nodes"] if n["feature"] != "err"} == set(data["sites"])
    between = {(e["source"].split("/")[0], e["target"].split("/")[0]) for e in data["edges"] if e["target"] != "y"}
    assert between == {("embed", "resid_0"), ("resid_0", "resid_1")}


def test_circuit_and_evaluate_commands_at_optional_sites(tmp_path):
    """Gemma-2 with SAELens dictionaries at z_0 (n_heads * head_dim = 64 wide, d_model 32), resid_mid_1 and
    resid_1: a circuit with the z_0 -> resid_mid_1 edges (through attention's output projection and layer 0's
    MLP, neither with a dictionary, so neither frozen) and the resid_mid_1 -> resid_1 edges, then `minicirc
    evaluate` of it, whose unablated metric is the circuit's clean metric and whose empty circuit moves it."""
    from minicirc.cli import main
    hooks = ["blocks.0.attn.hook_z", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]
    data, common = _saelens_run(tmp_path, "gemma2 softcaps window", hooks)
    assert data["sites"] == ["z_0", "resid_mid_1", "resid_1"]
    assert {n["site"] for n in data["nodes"] if n["feature"] != "err"} == set(data["sites"])
    circuit = minicirc.Circuit.load(tmp_path / "out")
    assert set(circuit.edges) == {("z_0", "resid_mid_1"), ("resid_mid_1", "resid_1")}
    assert all(vals._nnz() for _, vals in circuit.edges.values())
    assert main(["evaluate", *common, "--circuit", str(tmp_path / "out"), "--out", str(tmp_path / "eval")]) == 0
    ev = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert ev["m_full"] == pytest.approx(data["metric"]["clean"], abs=1e-5)
    assert abs(ev["m_full"] - ev["m_empty"]) > 1e-3


# --- optional sites: z_l, resid_mid_l and mlp_hidden_l ---------------------------------------------------

def _hf_points(hf, kind, l):
    """transformers' modules whose input is z_l (the output projection), resid_mid_l (the norm that
    the MLP branch starts with) and mlp_hidden_l (the MLP's down projection)."""
    if kind == "gpt2":
        block = hf.transformer.h[l]
        return block.attn.c_proj, block.ln_2, block.mlp.c_proj
    block = hf.model.layers[l]
    return (block.self_attn.o_proj, (block.pre_feedforward_layernorm if kind == "gemma2" else block.post_attention_layernorm),
            block.mlp.down_proj)


@pytest.mark.parametrize("case", SITE_CASES)
def test_optional_sites_are_transformers_values(tmp_path, case):
    """z_l is the input of transformers' attention output projection, resid_mid_l the input of the norm
    before its MLP and mlp_hidden_l the input of its down projection; asking for them, or replacing them by
    themselves, leaves the logits unchanged."""
    kind, kw = CASES[case]
    hf = write_hf(tmp_path, kind, seed=12, **kw)
    model = minicirc.load_model(tmp_path)
    extra = [s for s in model.all_sites if s not in model.sites]
    assert extra == [f"{k}_{l}" for l in range(2) for k in ("z", "resid_mid", "mlp_hidden")]
    tokens = torch.randint(0, V, (2, 9))
    seen, handles = {}, []
    for l in range(2):
        for name, module in zip((f"z_{l}", f"resid_mid_{l}", f"mlp_hidden_{l}"), _hf_points(hf, kind, l)):
            handles.append(module.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0])))
    with torch.no_grad():
        expected = hf(tokens).logits
        for h in handles:
            h.remove()
        ref = model(tokens)
        cache = {}
        read = model(tokens, cache=cache, extra=extra)
        same = model(tokens, edit={s: (lambda x: x.clone()) for s in model.all_sites})
    assert torch.equal(read, ref) and torch.equal(same, ref) and (ref - expected).abs().max() <= 1e-5
    assert list(cache) == model.all_sites
    for name in extra:
        assert cache[name].shape == (2, 9, model.site_width(name))
        assert (cache[name] - seen[name]).abs().max().item() <= 1e-5, name
    # Without asking, the cache holds the usual sites only.
    plain = {}
    with torch.no_grad():
        model(tokens, cache=plain)
    assert list(plain) == model.sites


@pytest.mark.parametrize("target", ["z_0", "resid_mid_0", "mlp_hidden_0", "z_1"])
def test_optional_site_replacement_changes_only_downstream(tmp_path, target):
    kind, kw = CASES["llama llama3-rope gqa tied"]
    write_hf(tmp_path, kind, seed=13, **kw)
    model = minicirc.load_model(tmp_path)
    order = model.all_sites
    tokens = torch.randint(0, V, (2, 8))
    clean, edited = {}, {}
    noise = torch.randn(2, 8, model.site_width(target))
    with torch.no_grad():
        model(tokens, cache=clean, extra=order)
        model(tokens, cache=edited, extra=order, edit={target: lambda x: x + noise})
    i = order.index(target)
    for s in order[:i]:
        assert torch.equal(clean[s], edited[s]), f"{s} is upstream of {target}"
    for s in order[i + 1:]:
        assert (clean[s] - edited[s]).abs().max() > 1e-4, f"{s} is downstream of {target}"
    stopped = {}
    with torch.no_grad():
        assert model(tokens, cache=stopped, stop_at=target) is None
    layer = target[-1]    # mlp_hidden_l stops after the MLP, z_l and resid_mid_l before it
    assert target in stopped and (f"resid_{layer}" if "hidden" in target else f"mlp_{layer}") not in stopped


def _hf_mlp(hf, kind, l):
    """transformers' MLP module of layer l and the names of its activation module, its gate's partner (the
    up projection, None for an ungated MLP) and its down projection."""
    if kind == "gpt2":
        return hf.transformer.h[l].mlp, "act", None, "c_proj"
    if kind == "gpt_neox":
        return hf.gpt_neox.layers[l].mlp, "act", None, "dense_4h_to_h"
    return hf.model.layers[l].mlp, "act_fn", "up_proj", "down_proj"


@pytest.mark.parametrize("case", list(CASES) + ["gpt_neox parallel", "gpt_neox sequential"])
def test_mlp_hidden_is_transformers_hidden_activation(tmp_path, case):
    """mlp_hidden_l, on every family, is what transformers' MLP computes between its activation and its
    down projection: the activation module's output (times the up projection's for a gated MLP), and the
    down projection's input; it is d_mlp wide, and asking for it leaves the logits unchanged."""
    from conftest import write_hf_model
    if case.startswith("gpt_neox"):
        hf = write_hf_model(tmp_path, seed=6, parallel=case.endswith("parallel"), d_mlp=40)
        kind, vocab = "gpt_neox", 61
    else:
        kind, kw = CASES[case]
        hf = write_hf(tmp_path, kind, seed=16, **kw)
        vocab = V
    model = minicirc.load_model(tmp_path)
    hidden = [f"mlp_hidden_{l}" for l in range(model.cfg.n_layers)]
    assert [s for s in model.all_sites if "hidden" in s] == hidden
    tokens = torch.randint(0, vocab, (2, 9))
    act, up, down, handles = {}, {}, {}, []
    for l in range(model.cfg.n_layers):
        mlp, act_name, up_name, down_name = _hf_mlp(hf, kind, l)
        handles.append(getattr(mlp, act_name).register_forward_hook(lambda m, a, out, l=l: act.__setitem__(l, out)))
        if up_name:
            handles.append(getattr(mlp, up_name).register_forward_hook(lambda m, a, out, l=l: up.__setitem__(l, out)))
        handles.append(getattr(mlp, down_name).register_forward_pre_hook(lambda m, a, l=l: down.__setitem__(l, a[0])))
    cache = {}
    with torch.no_grad():
        expected = hf(tokens).logits
        for h in handles:
            h.remove()
        got = model(tokens, cache=cache, extra=hidden)
    assert (got - expected).abs().max() <= 1e-5
    for l, name in enumerate(hidden):
        assert cache[name].shape == (2, 9, model.site_width(name)) and model.site_width(name) == model.cfg.d_mlp
        gated = act[l] * up[l] if l in up else act[l]
        assert (cache[name] - gated).abs().max().item() <= 1e-5, name
        assert (cache[name] - down[l]).abs().max().item() <= 1e-5, name
        assert cache[name].abs().max() > 0.1
    assert bool(up) == (kind not in ("gpt2", "gpt_neox"))      # the gated families multiply by up_proj


def test_gpt_neox_z_site_and_no_resid_mid(tiny_model_dir):
    """GPT-NeoX (parallel residual): z_l is the input of transformers' attention.dense; resid_mid_l does
    not exist, as its MLP never reads the residual after attention."""
    from transformers import GPTNeoXForCausalLM
    hf = GPTNeoXForCausalLM.from_pretrained(tiny_model_dir).eval()
    model = minicirc.load_model(tiny_model_dir)
    assert "resid_mid_0" not in model.all_sites and "z_1" in model.all_sites
    tokens = torch.randint(0, 61, (2, 7))
    seen = {}
    h = hf.gpt_neox.layers[1].attention.dense.register_forward_pre_hook(lambda m, a: seen.setdefault("z", a[0]))
    cache = {}
    with torch.no_grad():
        hf(tokens)
        h.remove()
        model(tokens, cache=cache, extra=["z_1"])
    assert (cache["z_1"] - seen["z"]).abs().max().item() <= 1e-5
    with pytest.raises(MinicircError, match="unknown site 'resid_mid_0'"):
        model(tokens, extra=["resid_mid_0"])


def test_circuit_command_refuses_unsupported_models_in_one_line(tmp_path, capsys):
    from minicirc.cli import main
    from test_cli import ROWS, write_data, write_tokenizer
    write_hf(tmp_path / "model", "llama", seed=14)
    write_tokenizer(tmp_path / "model", V)
    write_data(tmp_path / "data.jsonl", ROWS)
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    args = ["circuit", "--model", str(tmp_path / "model"), "--saes", "neurons", "--data", str(tmp_path / "data.jsonl")]
    for i, (change, msg) in enumerate([({"model_type": "mixtral"}, "model_type 'mixtral' is not supported"),
                                       ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope type 'yarn'")]):
        (tmp_path / "model" / "config.json").write_text(json.dumps({**cfg, **change}))
        capsys.readouterr()
        assert main(args + ["--out", str(tmp_path / f"out{i}")]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / f"out{i}").exists()


@pytest.mark.parametrize("case", ["gpt2", "qwen3 qk-norm head_dim", "gemma2 softcaps window", "gpt_neox parallel",
                                  "gpt_neox sequential"])
def test_forward_from_equals_forward(tmp_path, case):
    """Resuming at any site from a clean run's cache gives what the whole forward pass gives with the same
    edit at that site (bit for bit: the values below are the ones the clean run computed), and fills the
    cache with the same values; sites before the start are taken from the clean run, not recomputed."""
    from conftest import write_hf_model
    if case.startswith("gpt_neox"):
        write_hf_model(tmp_path, seed=3, parallel=case.endswith("parallel"))
        vocab = 61
    else:
        kind, kw = CASES[case]
        write_hf(tmp_path, kind, seed=15, **kw)
        vocab = V
    model = minicirc.load_model(tmp_path)
    tokens = torch.randint(0, vocab, (3, 9))
    clean = {}
    with torch.no_grad():
        model(tokens, cache=clean, extra=model.all_sites)
        for start in model.all_sites:
            noise = torch.randn(3, 9, model.site_width(start))
            edit = {start: lambda x: x + noise}
            want_cache, got_cache = {}, {}
            want = model(tokens, edit=edit, cache=want_cache)
            got = model.forward_from(start, clean, tokens, edit=edit, cache=got_cache)
            assert torch.equal(got, want), start
            for s, v in want_cache.items():
                assert torch.equal(got_cache[s], v), (start, s)
            # below the start nothing is computed: a poisoned clean value shows up unchanged
            below = model.all_sites[:model.all_sites.index(start)]
            std = [s for s in below if s in model.sites]
            if std:
                poisoned = {**clean, std[-1]: clean[std[-1]] + 1.0}
                seen = {}
                model.forward_from(start, poisoned, tokens, edit=edit, cache=seen, stop_at=start)
                assert torch.equal(seen[std[-1]], poisoned[std[-1]])
