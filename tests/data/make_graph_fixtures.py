"""Write tiny random Llama and Gemma-2 models, circuit-tracer transcoder sets for them, and circuit-tracer's own
attribution graphs and pruning masks on one prompt (tests/data/graph_refs.safetensors), which
tests/test_graph_circuit_tracer.py compares minicirc's graphs with.

Runs only where circuit-tracer 0.5.0 and its TransformerLens backend are installed (a throwaway environment;
the versions used are in tests/data/README.md):

    python3 -m venv /tmp/ct; /tmp/ct/bin/pip install -c constraints.txt torch==2.13.0 circuit-tracer==0.5.0
    /tmp/ct/bin/python tests/data/make_graph_fixtures.py          # constraints.txt: torch==2.13.0, nnsight<0.7

The models are saved by transformers (config.json + model.safetensors + tokenizer.json) and converted for
circuit-tracer by TransformerLens' own weight conversion (no layer norm folding, no centring: what
circuit-tracer's from_pretrained asks for); the transcoders are saved by circuit-tracer's TranscoderSet and
read back by its own loader. Everything is float32 on the CPU, weights seeded.
"""
import os
import shutil

import torch
import transformers as tf
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import convert_gemma_weights, convert_llama_weights

import circuit_tracer
from circuit_tracer import attribute
from circuit_tracer.graph import prune_graph
from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
from circuit_tracer.transcoder.activation_functions import JumpReLU
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder, load_clt
from circuit_tracer.transcoder.single_layer_transcoder import (SingleLayerTranscoder, TranscoderSet,
                                                               load_transcoder_set)

HERE = os.path.dirname(os.path.abspath(__file__))
V, D, L, NF = 32, 16, 2, 16
PROMPT = [0, 7, 19, 3, 25, 11, 30]          # token 0 is the BOS


def hf_model(kind, seed):
    """A random transformers model (weights moved off their initial values), its TransformerLens config."""
    base = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=24, max_position_embeddings=32, tie_word_embeddings=False, bos_token_id=0)
    tl = dict(d_model=D, d_head=D // 4, n_heads=4, n_key_value_heads=2, d_mlp=24, n_layers=L, n_ctx=32,
              d_vocab=V, normalization_type="RMS", positional_embedding_type="rotary", rotary_adjacent_pairs=False,
              rotary_dim=D // 4, final_rms=True, gated_mlp=True, dtype=torch.float32, device="cpu")
    if kind == "llama":
        config, cls = tf.LlamaConfig(**base, rms_norm_eps=1e-5, hidden_act="silu"), tf.LlamaForCausalLM
        tl.update(eps=1e-5, act_fn="silu", original_architecture="LlamaForCausalLM")
    else:
        config = tf.Gemma2Config(**base, head_dim=D // 4, query_pre_attn_scalar=D // 4, attn_logit_softcapping=3.0,
                                 final_logit_softcapping=5.0, sliding_window=16, rms_norm_eps=1e-6,
                                 hidden_activation="gelu_pytorch_tanh")
        cls = tf.Gemma2ForCausalLM
        tl.update(eps=1e-6, act_fn="gelu_pytorch_tanh", use_attn_scale=True, window_size=16, use_local_attn=True,
                  attn_types=["global", "local"] * (L // 2), attn_scores_soft_cap=3.0, output_logits_soft_cap=5.0,
                  use_normalization_before_and_after=True, original_architecture="Gemma2ForCausalLM")
    config._attn_implementation = "eager"    # transformers' sdpa path drops Gemma-2's attention soft-cap
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model, HookedTransformerConfig(**tl)


def tokenizer():
    vocab = {"<bos>": 0, **{f"t{i}": i for i in range(1, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<bos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()       # "t7 t19" -> [7, 19]
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<bos>")


def transcoder_set(folder, kind, skip, hook_in, hook_out, seed):
    """Random transcoders saved by circuit-tracer, with the config.yaml minicirc and circuit-tracer read."""
    g = torch.Generator().manual_seed(seed)
    tcs = {}
    for l in range(L):
        act = JumpReLU(torch.rand(NF, generator=g) * 0.3, 0.1) if kind == "jumprelu" else torch.relu
        t = SingleLayerTranscoder(D, NF, act, l, skip_connection=skip, device="cpu", dtype=torch.float32)
        with torch.no_grad():
            t.W_enc.copy_(torch.randn(NF, D, generator=g) / D ** 0.5 * 1.5)
            t.b_enc.copy_(0.3 * torch.randn(NF, generator=g) - 0.2)
            t.W_dec.copy_(0.5 * torch.randn(NF, D, generator=g))
            t.b_dec.copy_(0.3 * torch.randn(D, generator=g))
            if skip:
                t.W_skip.copy_(0.3 * torch.randn(D, D, generator=g))
        tcs[l] = t
    shutil.rmtree(folder, ignore_errors=True)
    TranscoderSet(tcs, hook_in, hook_out).to_safetensors(folder)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write(f"model_kind: transcoder_set\nfeature_input_hook: {hook_in}\nfeature_output_hook: {hook_out}\n"
                f"scan: {os.path.basename(folder)}\n")
    paths = {l: os.path.join(folder, f"layer_{l}.safetensors") for l in range(L)}
    return load_transcoder_set(paths, os.path.basename(folder), hook_in, hook_out, device=torch.device("cpu"),
                               lazy_encoder=False, lazy_decoder=False)


def cross_layer_transcoder(folder, hook_in, hook_out, seed):
    """A random JumpReLU cross-layer transcoder saved by circuit-tracer (W_enc_<i>, W_dec_<i> files and the
    config.yaml naming its kind and hooks), read back by its own loader."""
    g = torch.Generator().manual_seed(seed)
    clt = CrossLayerTranscoder(L, NF, D, "jump_relu", lazy_decoder=False, feature_input_hook=hook_in,
                               feature_output_hook=hook_out, device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        clt.W_enc.copy_(torch.randn(L, NF, D, generator=g) / D ** 0.5 * 1.5)
        clt.b_enc.copy_(0.3 * torch.randn(L, NF, generator=g) - 0.2)
        clt.b_dec.copy_(0.3 * torch.randn(L, D, generator=g))
        clt.activation_function.threshold.copy_(torch.rand(L, 1, NF, generator=g) * 0.3)
        for i in range(L):
            clt.W_dec[i].copy_(0.5 * torch.randn(NF, L - i, D, generator=g))
    shutil.rmtree(folder, ignore_errors=True)
    clt.to_safetensors(folder)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write(f"model_kind: cross_layer_transcoder\nfeature_input_hook: {hook_in}\nfeature_output_hook: {hook_out}\n"
                f"scan: {os.path.basename(folder)}\n")
    return load_clt(folder, hook_in, hook_out, device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)


CASES = {  # name: (model, transcoder kind, skip, input hook, output hook)
    "llama_relu_skip": ("llama", "relu", True, "mlp.hook_in", "mlp.hook_out"),
    "llama_jumprelu_resid_mid": ("llama", "jumprelu", False, "hook_resid_mid", "hook_mlp_out"),
    "gemma2_jumprelu_skip": ("gemma2", "jumprelu", True, "mlp.hook_in", "hook_mlp_out"),
    "llama_clt": ("llama", "clt", False, "hook_resid_mid", "hook_mlp_out"),
}


def main():
    refs = {}
    models = {}
    for kind, seed in (("llama", 1), ("gemma2", 2)):
        folder = os.path.join(HERE, f"graph_{kind}")
        shutil.rmtree(folder, ignore_errors=True)
        hf, cfg = hf_model(kind, seed)
        hf.save_pretrained(folder)
        tokenizer().save_pretrained(folder)
        for name in os.listdir(folder):       # keep what minicirc and this script read
            if name not in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                            "special_tokens_map.json"):
                os.remove(os.path.join(folder, name))
        convert = convert_llama_weights if kind == "llama" else convert_gemma_weights
        models[kind] = (hf, cfg, convert(hf, cfg))
    for i, (case, (kind, tkind, skip, hook_in, hook_out)) in enumerate(CASES.items()):
        hf, cfg, state = models[kind]
        folder = os.path.join(HERE, f"graph_{kind}", case)
        tcs = (cross_layer_transcoder(folder, hook_in, hook_out, 10 + i) if tkind == "clt"
               else transcoder_set(folder, tkind, skip, hook_in, hook_out, 10 + i))
        tok = tf.AutoTokenizer.from_pretrained(os.path.join(HERE, f"graph_{kind}"))
        model = TransformerLensReplacementModel(cfg, tokenizer=tok)
        model.load_and_process_state_dict(dict(state), fold_ln=False, center_writing_weights=False, center_unembed=False,
                                          fold_value_biases=False)
        model._configure_replacement_model(tcs)
        with torch.no_grad():     # the conversion keeps the model: its logits are transformers'
            gap = (model(torch.tensor([PROMPT])) - hf(torch.tensor([PROMPT])).logits).abs().max().item()
        assert gap < 1e-4, (case, gap)
        graph = attribute(torch.tensor(PROMPT), model, batch_size=16)
        pruned = prune_graph(graph)
        for k in ("adjacency_matrix", "active_features", "activation_values", "selected_features", "input_tokens",
                  "logit_probabilities"):
            refs[f"{case}.{k}"] = getattr(graph, k).detach().cpu().contiguous()
        refs[f"{case}.logit_token_ids"] = graph.logit_token_ids.cpu()
        for k, v in zip(("node_mask", "edge_mask", "cumulative_scores"), pruned):
            refs[f"{case}.{k}"] = v.cpu().contiguous()
        print(case, "nodes", graph.adjacency_matrix.shape[0], "features", len(graph.selected_features),
              "logits", len(graph.logit_token_ids), "HF gap", gap)
    save_file(refs, os.path.join(HERE, "graph_refs.safetensors"),
              metadata={"circuit_tracer": circuit_tracer.__version__ if hasattr(circuit_tracer, "__version__") else "0.5.0",
                        "torch": torch.__version__, "prompt": ",".join(map(str, PROMPT))})


if __name__ == "__main__":
    main()
