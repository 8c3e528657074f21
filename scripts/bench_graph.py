"""Time and peak memory of one attribution graph, minicirc against circuit-tracer 0.5.0 on the same CPU, model,
transcoder files and prompt, in one run: a random model of SmolLM2-135M's shape (Llama, 30 layers, d_model 576,
9 heads / 3 key-value heads, d_mlp 1536, vocabulary 49152, tied embeddings), random JumpReLU skip transcoders
of 8x width (4608 features) at every layer in circuit-tracer's files, thresholds set for about --active
features per token and layer, a prompt of --tokens random ids (the first a special token, whose position
carries no node).

    python scripts/bench_graph.py --ct-python /tmp/ct/bin/python [--tokens 64] [--batch-size 32] [--threads 1]

Each library runs in its own child process (circuit-tracer in the environment of --ct-python, with its
TransformerLens backend, the model converted by TransformerLens' own weight conversion); each reports the wall
and CPU seconds of the graph call alone (CPU time is less sensitive to other work on the machine), the RSS
just before it and the peak RSS during it (sampled every 5 ms), and the driver prints the ratios and checks
that the two adjacency matrices agree. Both use at most --batch-size target rows per backward pass (minicirc's
for this Llama: the written-out one, attribution.graph_backward.HeldLayers). The model and transcoders are
random: this measures time and memory only.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SMOLLM2 = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
               num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
               max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
               hidden_act="silu", bos_token_id=0, torch_dtype="float32")


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The largest RSS seen while the block runs (sampled every 5 ms on a thread)."""

    def __enter__(self):
        self.peak, self.done = rss(), False
        def watch():
            while not self.done:
                self.peak = max(self.peak, rss())
                time.sleep(0.005)
        self.thread = threading.Thread(target=watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()
        self.peak = max(self.peak, rss())


def build(work, n_layers, d_mlp_x, active, tokens, seed=0):
    """The model folder (minicirc's save_model: config.json + model.safetensors, and a word-level tokenizer in
    which id 0 is special), the transcoder-set folder and prompt.json."""
    sys.path.insert(0, os.path.dirname(HERE))
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models
    from minicirc.model import save_model
    from minicirc.model.llama import Llama, config_from_hf
    hf = dict(SMOLLM2, num_hidden_layers=n_layers)
    torch.manual_seed(seed)
    model = Llama(config_from_hf(hf))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    save_model(model, os.path.join(work, "model"))
    vocab = {"<s>": 0, **{f"t{i}": i for i in range(1, hf["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<s>"))
    tok.add_special_tokens(["<s>"])
    tok.save(os.path.join(work, "model", "tokenizer.json"))
    with open(os.path.join(work, "model", "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "unk_token": "<s>"}, f)
    d, F = hf["hidden_size"], hf["hidden_size"] * d_mlp_x
    tc = os.path.join(work, "transcoders")
    os.makedirs(tc, exist_ok=True)
    g = torch.Generator().manual_seed(seed + 1)
    # pre = W_enc u + b_enc with W_enc rows N(0, 1/d) and |u| about sqrt(d) (u is the normed MLP input): about
    # N(0, 1); a threshold t keeps the fraction P(N(0,1) > t) = active / F of the features.
    t = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - active / F)))
    for l in range(n_layers):
        save_file({"W_enc": torch.randn(F, d, generator=g) / d ** 0.5, "b_enc": torch.zeros(F),
                   "W_dec": torch.randn(F, d, generator=g) / d ** 0.5, "b_dec": 0.1 * torch.randn(d, generator=g),
                   "W_skip": 0.1 * torch.randn(d, d, generator=g) / d ** 0.5,
                   "activation_function.threshold": t + 0.1 * torch.rand(F, generator=g)},
                  os.path.join(tc, f"layer_{l}.safetensors"))
    with open(os.path.join(tc, "config.yaml"), "w") as f:
        f.write("model_kind: transcoder_set\nfeature_input_hook: mlp.hook_in\nfeature_output_hook: mlp.hook_out\n"
                "scan: bench\n")
    ids = [0] + torch.randint(1, hf["vocab_size"], (tokens - 1,), generator=g).tolist()
    with open(os.path.join(work, "prompt.json"), "w") as f:
        json.dump(ids, f)


def child_minicirc(work, batch_size):
    sys.path.insert(0, os.path.dirname(HERE))
    import minicirc
    from minicirc.attribution.graph import attribution_graph
    from minicirc.sae import load_transcoder_set
    model = minicirc.load_model(os.path.join(work, "model"))
    tcs = load_transcoder_set(os.path.join(work, "transcoders"))
    tokens = torch.tensor(json.load(open(os.path.join(work, "prompt.json"))))
    before = rss()
    with PeakRSS() as peak:
        t, c = time.perf_counter(), time.process_time()
        g = attribution_graph(model, tcs, tokens, batch_size=batch_size)
        seconds, cpu = time.perf_counter() - t, time.process_time() - c
    return g.adjacency_matrix, g.n_features, seconds, cpu, before, peak.peak


def child_circuit_tracer(work, batch_size):
    import transformers as tf
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from circuit_tracer import attribute
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
    folder = os.path.join(work, "model")
    hf_cfg = json.load(open(os.path.join(folder, "config.json")))
    hf = tf.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    d, H = hf_cfg["hidden_size"], hf_cfg["num_attention_heads"]
    cfg = HookedTransformerConfig(
        d_model=d, d_head=d // H, n_heads=H, n_key_value_heads=hf_cfg["num_key_value_heads"],
        d_mlp=hf_cfg["intermediate_size"], n_layers=hf_cfg["num_hidden_layers"], n_ctx=hf_cfg["max_position_embeddings"],
        d_vocab=hf_cfg["vocab_size"], eps=hf_cfg["rms_norm_eps"], act_fn="silu", normalization_type="RMS",
        positional_embedding_type="rotary", rotary_adjacent_pairs=False, rotary_dim=d // H,
        rotary_base=hf_cfg["rope_theta"], final_rms=True, gated_mlp=True, original_architecture="LlamaForCausalLM",
        dtype=torch.float32, device="cpu")
    state = convert_llama_weights(hf, cfg)
    del hf
    tc = os.path.join(work, "transcoders")
    n = len([f for f in os.listdir(tc) if f.startswith("layer_")])
    tcs = load_transcoder_set({l: os.path.join(tc, f"layer_{l}.safetensors") for l in range(n)}, "bench",
                              "mlp.hook_in", "mlp.hook_out", device=torch.device("cpu"), lazy_encoder=False,
                              lazy_decoder=False)
    model = TransformerLensReplacementModel(cfg, tokenizer=tf.AutoTokenizer.from_pretrained(folder))
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False)
    del state
    model._configure_replacement_model(tcs)
    tokens = torch.tensor(json.load(open(os.path.join(work, "prompt.json"))))
    before = rss()
    with PeakRSS() as peak:
        t, c = time.perf_counter(), time.process_time()
        g = attribute(tokens, model, batch_size=batch_size)
        seconds, cpu = time.perf_counter() - t, time.process_time() - c
    return g.adjacency_matrix, len(g.selected_features), seconds, cpu, before, peak.peak


def run_child(python, which, work, batch_size, threads):
    out = os.path.join(work, f"{which}.pt")
    subprocess.run([python, os.path.abspath(__file__), "--child", which, "--work", work, "--batch-size",
                    str(batch_size), "--threads", str(threads)], check=True,
                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return torch.load(out, weights_only=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ct-python", default=None, help="python of an environment with circuit-tracer 0.5.0")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--width", type=int, default=8, help="transcoder features per d_model")
    p.add_argument("--active", type=float, default=2.0, help="about this many active features per token and layer")
    p.add_argument("--batch-size", type=int, default=64, help="target rows per backward pass (both)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=None, help="folder for the files (default: a temporary one)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.child:
        fn = child_minicirc if a.child == "minicirc" else child_circuit_tracer
        A, n_f, seconds, cpu, before, peak = fn(a.work, a.batch_size)
        torch.save({"A": A.float(), "n_features": n_f, "seconds": seconds, "cpu": cpu, "before": before, "peak": peak},
                   os.path.join(a.work, f"{a.child}.pt"))
        return
    work = a.work or tempfile.mkdtemp(prefix="bench_graph_")
    build(work, a.layers, a.width, a.active, a.tokens)
    results = {"minicirc": run_child(sys.executable, "minicirc", work, a.batch_size, a.threads)}
    if a.ct_python:
        results["circuit-tracer"] = run_child(a.ct_python, "circuit-tracer", work, a.batch_size, a.threads)
    r = results["minicirc"]
    print(f"{a.layers} layers, {a.tokens} tokens, {r['n_features']} active features, "
          f"{r['A'].shape[0]} nodes, batch {a.batch_size}, {a.threads} thread(s), torch {torch.__version__}")
    print(f"{'':16}{'wall s':>9}{'CPU s':>9}{'RSS before GiB':>16}{'peak RSS GiB':>14}{'graph GiB':>11}")
    for name, r in results.items():
        print(f"{name:16}{r['seconds']:9.1f}{r['cpu']:9.1f}{r['before'] / 2**30:16.2f}{r['peak'] / 2**30:14.2f}"
              f"{(r['peak'] - r['before']) / 2**30:11.2f}")
    if len(results) == 2:
        m, c = results["minicirc"], results["circuit-tracer"]
        gap = float((m["A"] - c["A"]).abs().max() / c["A"].abs().max())
        print(f"circuit-tracer / minicirc: wall time {c['seconds'] / m['seconds']:.2f}x, CPU time "
              f"{c['cpu'] / m['cpu']:.2f}x, peak RSS "
              f"{c['peak'] / m['peak']:.2f}x, graph memory {(c['peak'] - c['before']) / (m['peak'] - m['before']):.2f}x; "
              f"max |A difference| / max |A| = {gap:.1e}")


if __name__ == "__main__":
    main()
