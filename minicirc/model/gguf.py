"""Reading a llama-architecture .gguf file (llama.cpp's format) as a Llama model and its tokenizer.

Needs the optional `gguf` package (pip install minicirc[gguf]). Every tensor is dequantized to float32 by
gguf's own numpy code; the file is then one more Hugging Face Llama checkpoint: its metadata becomes a
config.json dict and its tensor names the Hugging Face ones, and checkpoints.load_model builds a llama.py
model from them (this file only reads). Two things
llama.cpp changed on the way in are undone here: its converter permutes the rows of q and k from the
"rotate half" rotary layout to interleaved pairs, and it spells byte-level BPE tokens in raw UTF-8.
"""
import os

import numpy as np
import torch

from ..errors import MinicircError

# GGUF tensor name (after "blk.N.") -> Hugging Face Llama name (after "model.layers.N.").
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


def _reader(path):
    path = os.fspath(path)
    try:
        import gguf
    except ImportError:
        raise MinicircError(f"{path}: reading .gguf files needs the gguf package (pip install gguf)") from None
    if not os.path.isfile(path):
        raise MinicircError(f"GGUF file {path} does not exist")
    try:
        return gguf, gguf.GGUFReader(path)
    except Exception as e:
        raise MinicircError(f"{path}: cannot read GGUF file ({type(e).__name__}: {e})") from None


def _metadata(reader):
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _unpermute(w, n_heads):
    """Undo llama.cpp's q/k row permutation: per head it stores rows as interleaved (x0, x_{d/2}, x1, ...)
    pairs; the Hugging Face layout (and llama.py's rotate_half) wants the two halves one after the other."""
    d = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path):
    """(config.json dict, {Hugging Face name: float32 tensor}, rope_freqs factors or None) of a
    llama-architecture GGUF file."""
    gguf, reader = _reader(path)
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise MinicircError(f"{path}: general.architecture is {arch!r}; only llama GGUF files are supported")
    get = lambda key, default=None: meta.get(f"llama.{key}", default)
    for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count"):
        if get(key) is None:
            raise MinicircError(f"{path}: metadata llama.{key} is missing")
    if get("expert_count"):
        raise MinicircError(f"{path}: llama.expert_count = {get('expert_count')}: mixture of experts is not supported")
    if get("rope.scaling.type", "none") not in ("none", None):
        raise MinicircError(f"{path}: llama.rope.scaling.type {get('rope.scaling.type')!r} is not supported")
    d, heads = get("embedding_length"), get("attention.head_count")
    kv = get("attention.head_count_kv") or heads
    head_dim = get("attention.key_length") or d // heads
    if get("rope.dimension_count", head_dim) != head_dim:
        raise MinicircError(f"{path}: llama.rope.dimension_count {get('rope.dimension_count')} differs from the "
                            f"head size {head_dim}; partial rotary is not supported")
    state, rope_factors = {}, None
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":   # llama 3.x: the rotary rescaling, one factor per frequency
            rope_factors = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1)
            if rope_factors.shape != (head_dim // 2,):
                raise MinicircError(f"{path}: rope_freqs.weight has {rope_factors.size} factors, the head size "
                                    f"{head_dim} needs {head_dim // 2}")
            continue
        if t.name.startswith("blk."):
            _, l, rest = t.name.split(".", 2)
            name = f"model.layers.{l}.{LAYER_NAMES[rest]}" if rest in LAYER_NAMES else None
        else:
            name = TOP_NAMES.get(t.name)
        if name is None:
            # biases, experts, ...: a tensor we would otherwise silently drop
            raise MinicircError(f"{path}: tensor {t.name} is not part of the llama layout minicirc reads")
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if t.name.endswith("attn_q.weight"):
            w = _unpermute(w, heads)
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute(w, kv)
        state[name] = torch.from_numpy(w.copy())
    if "model.embed_tokens.weight" not in state:
        raise MinicircError(f"{path}: tensor token_embd.weight is missing")
    vocab = get("vocab_size") or state["model.embed_tokens.weight"].shape[0]
    hf = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
          "hidden_size": d, "num_hidden_layers": get("block_count"), "num_attention_heads": heads,
          "num_key_value_heads": kv, "head_dim": head_dim, "intermediate_size": get("feed_forward_length"),
          "max_position_embeddings": get("context_length", 2048),
          "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
          "rope_parameters": {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000.0))},
          "tie_word_embeddings": "lm_head.weight" not in state, "hidden_act": "silu",
          "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
          "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"), "dtype": "float32"}
    return hf, state, None if rope_factors is None else tuple(rope_factors.tolist())


# How text is split into words before BPE, by llama.cpp's tokenizer.ggml.pre name: GPT-2's regex (what
# pre_tokenizers.ByteLevel applies by default), or Llama 3's, which keeps runs of up to 3 digits together.
GPT2_SPLIT_PRE = {None, "default", "gpt2", "gpt-2", "smollm"}
LLAMA3_SPLIT_PRE = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe"}
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_alphabet():
    """GPT-2's map from bytes to printable characters, in which byte-level BPE vocabularies are spelled."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def load_gguf_tokenizer(path):
    """The byte-level BPE tokenizer (tokenizer.ggml.model "gpt2") a GGUF file describes, as a
    `tokenizers.Tokenizer`; control tokens (type 3) become special tokens, user-defined ones (type 4) added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    _, reader = _reader(path)
    meta = _metadata(reader)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise MinicircError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (only gpt2, byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in GPT2_SPLIT_PRE | LLAMA3_SPLIT_PRE:   # others (qwen2, tekken, ...) split text differently
        raise MinicircError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported (supported: "
                            f"{', '.join(sorted(p for p in GPT2_SPLIT_PRE | LLAMA3_SPLIT_PRE if p))})")
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise MinicircError(f"{path}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing")
    spell = _byte_alphabet()
    alphabet = set(spell.values())
    # llama.cpp writes some tokens in raw UTF-8; the BPE model wants them in the byte alphabet.
    vocab = {tok if set(tok) <= alphabet else "".join(spell[b] for b in tok.encode("utf-8")): i
             for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in merges]))
    if pre in LLAMA3_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    special = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
               if k == 3 and set(t) <= alphabet]
    user = [AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == 4 and t in vocab]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    return tok
