"""`minicirc demo`: are circuits over SAE features more discoverable and easier to understand than circuits
over neurons? Answered on the embedded default (a tiny model trained on a synthetic language whose latent
variables are known), for the four agreement templates of the original work, or on a pretrained model with
SAEs minicirc trains on it (real_lm.py).

The comparison itself (the protocols, curves, interpretability scores, report) is compare.py's, the same
that `minicirc compare` runs on files from disk: this module only makes the demo's subjects, the model,
dictionaries, prompts and settings of each.
"""

from ..data import tokenize
from ..errors import MinicircError
from ..evaluation import pair_accuracy
from . import real_lm
from .compare import output_neurons, run_comparison
from .default import get_default
from .tasks import agreement

SETTINGS = {
    "full": dict(n_discovery=200, n_eval=100, steps=10, node_threshold=0.1, edge_threshold=0.02, top_k=10,
                 grid_points=32, n_interp=200),
    "quick": dict(n_discovery=8, n_eval=8, steps=3, node_threshold=0.05, edge_threshold=0.01, top_k=5,
                  grid_points=6, n_interp=16),
}
REAL_LM_SETTINGS = {
    # The paper's sizes: 100 discovery prompts naming every noun of the 40 test prompts (real_lm_examples).
    # simple's held-out split has about 80 distinct prompts with these verbs, so n_eval stays below it.
    "full": dict(n_discovery=100, n_eval=40, steps=10, node_threshold=0.1, edge_threshold=0.02, top_k=10,
                 grid_points=12, n_interp=48, n_accuracy=64, min_accuracy=0.9),
    # Smoke tests on tiny random models: nothing is excluded (a random model is never accurate).
    "quick": dict(n_discovery=12, n_eval=4, steps=2, node_threshold=0.05, edge_threshold=0.01, top_k=3,
                  grid_points=4, n_interp=4, n_accuracy=8, min_accuracy=0.0),
}
# The sets a real model's circuits are also measured on, besides the held-out prompts (real_lm_examples).
EVALUATION_SETS = ["in_sample", "held_out_seen", "held_out_unseen", "novel"]
# (size setting, seed, split) of each role's examples: discovery, held-out evaluation, interpretability.
ROLES = {"discovery": ("n_discovery", 0, "train"), "held_out": ("n_eval", 2, "test"), "interp": ("n_interp", 3, "test")}


def by_role(make, cfg):
    """examples(template, role) for compare.run_comparison, from make(template, n, seed, split)."""
    def examples(template, role):
        size, seed, split = ROLES[role]
        return make(template, cfg[size], seed, split)
    return examples


def real_lm_examples(tokenizer, cfg, lex):
    """(examples(template, role), coverage(template)) for a real model's prompts (every word one token).

    held_out        cfg["n_eval"] test-split prompts (seed 2) of the nouns the train split can name;
    discovery       cfg["n_discovery"] train-split prompts (seed 0) naming every noun of held_out
                    (real_lm.discovery_and_test): the circuits are found on these;
    in_sample       the discovery prompts themselves;
    held_out_seen   the held_out prompts whose every noun and verb (agreement.content_words: subject and
                    second-noun lemmas, the relative clause's verb lemma, the main verb) occurs in some
                    discovery prompt: by construction all of them but those with a verb discovery never uses;
    held_out_unseen test-split prompts (a second draw, seed 4, up to 4 n_eval) with at least one noun or
                    verb that no discovery prompt names, at most n_eval of them (none where discovery
                    names every word of the split);
    novel           the stored prompts with nouns and verbs the templates never use (tasks/novel.py);
    interp          cfg["n_interp"] test-split prompts (seed 3), for the interpretability scores.
    coverage(template): {"test_nouns": distinct noun lemmas of held_out, "covered": those named in discovery,
    "discovery_prompts", "test_prompts", "discovery_nouns", "held_out_seen", "held_out_unseen", "novel"}."""
    memo = {}

    def sets(template):
        if template not in memo:
            disc, held = real_lm.discovery_and_test(tokenizer, template, cfg["n_discovery"], cfg["n_eval"], lex,
                                                    seed=0, test_seed=2)
            words = real_lm.discovery_words(disc)
            pool = real_lm.draw_up_to(tokenizer, template, [4 * cfg["n_eval"], 2 * cfg["n_eval"], cfg["n_eval"]], 4,
                                      "test", lex)
            memo[template] = {"discovery": disc, "in_sample": disc, "held_out": held,
                              "held_out_seen": [ex for ex in held if real_lm.seen_in(ex, words)],
                              "held_out_unseen": [ex for ex in pool if not real_lm.seen_in(ex, words)][:cfg["n_eval"]],
                              "novel": real_lm.novel_examples(tokenizer, template),
                              "interp": real_lm.agreement_examples(tokenizer, template, cfg["n_interp"], 3, "test", lex),
                              "words": words}
        return memo[template]

    def coverage(template):
        got = sets(template)
        test_nouns = set().union(*(agreement.content_words(ex)[0] for ex in got["held_out"]))
        return {"test_nouns": len(test_nouns), "covered": len(test_nouns & got["words"][0]),
                "discovery_prompts": len(got["discovery"]), "test_prompts": len(got["held_out"]),
                "discovery_nouns": len(got["words"][0]),
                **{role: len(got[role]) for role in ("held_out_seen", "held_out_unseen", "novel")}}

    return (lambda template, role: sets(template)[role]), coverage


def default_subject(quick, progress):
    """The embedded default as the demo sees it: model, dictionaries, tokenizer, prompts, accuracy."""
    model, saes, tokenizer, stats, folder = get_default("quick" if quick else "full", progress=progress)
    cfg = SETTINGS["quick" if quick else "full"]
    return dict(model=model, saes=saes, tokenizer=tokenizer, cfg=cfg, neurons=[("neurons", output_neurons)],
                examples=by_role(lambda t, n, seed, split: agreement.make_examples(t, n, seed=seed, split=split), cfg),
                interp_templates=list(agreement.TEMPLATES), latents=True,
                accuracy=stats["agreement_accuracy"], templates=list(agreement.TEMPLATES),
                meta={"kind": "default", "default": folder, "stats": stats})


def real_lm_subject(name, quick, progress, device="cpu"):
    """A pretrained model (--model smollm2 or a path) with SAEs minicirc trains on it (real_lm.py: the "cuda"
    recipe, more text, when the demo runs on a GPU); templates the model gets right less often than
    min_accuracy are reported and left out of the comparison."""
    cfg = REAL_LM_SETTINGS["quick" if quick else "full"]
    recipe = "quick" if quick else "cuda" if str(device).startswith("cuda") else "full"
    model, saes, tokenizer, info = real_lm.load_real_lm(name, recipe, progress)
    lex = real_lm.lexicon_for(tokenizer)
    accuracy = real_lm.clean_and_patch_agreement_accuracy(model, tokenizer, cfg["n_accuracy"], lex=lex)
    compared = [t for t in agreement.TEMPLATES if accuracy[t] >= cfg["min_accuracy"]]
    if not compared:
        raise MinicircError(f"{info['title']}: no template reaches {cfg['min_accuracy']:.0%} agreement accuracy "
                            f"({', '.join(f'{t} {a:.0%}' for t, a in accuracy.items())}); nothing to compare")
    examples, coverage = real_lm_examples(tokenizer, cfg, lex)
    novel_accuracy = {t: pair_accuracy(model, tokenize(exs, tokenizer, vocab_size=model.cfg.vocab_size)) if exs else None
                      for t in agreement.TEMPLATES for exs in [examples(t, "novel")]}
    return dict(model=model, saes=saes, tokenizer=tokenizer, cfg=cfg, neurons=[("neurons", output_neurons)],
                examples=examples, evaluation_sets=list(EVALUATION_SETS),
                interp_templates=list(agreement.TEMPLATES), latents=True, accuracy=accuracy, templates=compared,
                cache=info["folder"], meta={"kind": "real", "load_seconds": info["seconds"],
                                            **{k: v for k, v in info.items() if k not in ("settings", "seconds")},
                      "sae_settings": info["settings"], "lexicon": {k: len(v) for k, v in lex._asdict().items()},
                      "coverage": {t: coverage(t) for t in agreement.TEMPLATES}, "novel_accuracy": novel_accuracy,
                      "config": {"n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model,
                                 "vocab_size": model.cfg.vocab_size}})


def run_demo(out="minicirc-demo", quick=False, overwrite=False, device="cpu", progress=True, first_layer=None,
             model="default"):
    """`minicirc demo`: on the embedded default (model="default"), or on a pretrained model ("smollm2", or
    the path of a Hugging Face folder or GGUF file) with SAEs trained by minicirc and cached."""
    subject = ((lambda: default_subject(quick, progress)) if model == "default"
               else (lambda: real_lm_subject(model, quick, progress, device)))
    return run_comparison(subject, out, overwrite, device, progress, first_layer, command="demo")
