"""`minicirc demo`: are circuits over SAE features more discoverable and easier to understand than circuits
over neurons? Answered on the embedded default (a tiny model trained on a synthetic language whose latent
variables are known), for the four agreement templates of the original work, or on a pretrained model with
SAEs minicirc trains on it (real_lm.py).

The comparison itself (the protocols, curves, interpretability scores, report) is compare.py's, the same
that `minicirc compare` runs on files from disk: this module only makes the demo's subjects, the model,
dictionaries, prompts and settings of each.
"""

from ..errors import MinicircError
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
    # simple's held-out split has about 80 distinct prompts with these verbs, so n_eval stays below it.
    "full": dict(n_discovery=32, n_eval=64, steps=10, node_threshold=0.1, edge_threshold=0.02, top_k=10,
                 grid_points=12, n_interp=48, n_accuracy=64, min_accuracy=0.9),
    # Smoke tests on tiny random models: nothing is excluded (a random model is never accurate).
    "quick": dict(n_discovery=4, n_eval=4, steps=2, node_threshold=0.05, edge_threshold=0.01, top_k=3,
                  grid_points=4, n_interp=4, n_accuracy=8, min_accuracy=0.0),
}
# (size setting, seed, split) of each role's examples: discovery, held-out evaluation, interpretability.
ROLES = {"discovery": ("n_discovery", 0, "train"), "held_out": ("n_eval", 2, "test"), "interp": ("n_interp", 3, "test")}


def by_role(make, cfg):
    """examples(template, role) for compare.run_comparison, from make(template, n, seed, split)."""
    def examples(template, role):
        size, seed, split = ROLES[role]
        return make(template, cfg[size], seed, split)
    return examples


def default_subject(quick, progress):
    """The embedded default as the demo sees it: model, dictionaries, tokenizer, prompts, accuracy."""
    model, saes, tokenizer, stats, folder = get_default("quick" if quick else "full", progress=progress)
    cfg = SETTINGS["quick" if quick else "full"]
    return dict(model=model, saes=saes, tokenizer=tokenizer, cfg=cfg, neurons=[("neurons", output_neurons)],
                examples=by_role(lambda t, n, seed, split: agreement.make_examples(t, n, seed=seed, split=split), cfg),
                interp_templates=list(agreement.TEMPLATES), latents=True,
                accuracy=stats["agreement_accuracy"], templates=list(agreement.TEMPLATES),
                meta={"kind": "default", "default": folder, "stats": stats})


def real_lm_subject(name, quick, progress):
    """A pretrained model (--model smollm2 or a path) with SAEs minicirc trains on it (real_lm.py); templates
    the model gets right less often than min_accuracy are reported and left out of the comparison."""
    recipe = "quick" if quick else "full"
    cfg = REAL_LM_SETTINGS[recipe]
    model, saes, tokenizer, info = real_lm.load_real_lm(name, recipe, progress)
    lex = real_lm.lexicon_for(tokenizer)
    accuracy = real_lm.clean_and_patch_agreement_accuracy(model, tokenizer, cfg["n_accuracy"], lex=lex)
    compared = [t for t in agreement.TEMPLATES if accuracy[t] >= cfg["min_accuracy"]]
    if not compared:
        raise MinicircError(f"{info['title']}: no template reaches {cfg['min_accuracy']:.0%} agreement accuracy "
                            f"({', '.join(f'{t} {a:.0%}' for t, a in accuracy.items())}); nothing to compare")
    return dict(model=model, saes=saes, tokenizer=tokenizer, cfg=cfg, neurons=[("neurons", output_neurons)],
                examples=by_role(lambda t, n, seed, split: real_lm.agreement_examples(tokenizer, t, n, seed, split,
                                                                                       lex), cfg),
                interp_templates=list(agreement.TEMPLATES), latents=True, accuracy=accuracy, templates=compared,
                cache=info["folder"], meta={"kind": "real", "load_seconds": info["seconds"],
                                            **{k: v for k, v in info.items() if k not in ("settings", "seconds")},
                      "sae_settings": info["settings"], "lexicon": {k: len(v) for k, v in lex._asdict().items()},
                      "config": {"n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model,
                                 "vocab_size": model.cfg.vocab_size}})


def run_demo(out="minicirc-demo", quick=False, overwrite=False, device="cpu", progress=True, first_layer=None,
             model="default"):
    """`minicirc demo`: on the embedded default (model="default"), or on a pretrained model ("smollm2", or
    the path of a Hugging Face folder or GGUF file) with SAEs trained by minicirc and cached."""
    subject = ((lambda: default_subject(quick, progress)) if model == "default"
               else (lambda: real_lm_subject(model, quick, progress)))
    return run_comparison(subject, out, overwrite, device, progress, first_layer, command="demo")
