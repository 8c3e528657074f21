"""A short real run on a random tiny model: save it in the Hugging Face layout and random SAEs in the
dictionary_learning layout, load both back, and splice every site through its SAE (x -> decode(f) + err)
to show the forward value is unchanged. Stands in for `minicirc demo` until the embedded default lands."""
import tempfile

import torch

import minicirc

torch.manual_seed(0)
cfg = minicirc.Config(vocab_size=100, d_model=32, n_layers=2, n_heads=4, d_mlp=64)
with tempfile.TemporaryDirectory() as tmp:
    minicirc.save_model(minicirc.GPTNeoX(cfg), f"{tmp}/model")
    model = minicirc.load_model(f"{tmp}/model")
    saes = {s: minicirc.Dictionary(torch.randn(32, 128), torch.randn(128) - 1, torch.randn(128, 32) / 8,
                                   torch.zeros(32), "relu") for s in model.sites}
    minicirc.save_saes(saes, f"{tmp}/saes")
    saes = minicirc.load_saes(f"{tmp}/saes", model)
    tokens = torch.randint(0, 100, (4, 12))
    with torch.no_grad():
        clean = model(tokens)
        l0 = {}
        def splice(site):
            def fn(x):
                f, err = saes[site](x)
                l0[site] = (f != 0).float().sum(-1).mean().item()
                return saes[site].decode(f) + err
            return fn
        spliced = model(tokens, edit={s: splice(s) for s in model.sites})
    print(f"sites: {', '.join(model.sites)}")
    print("mean L0 per site: " + ", ".join(f"{s} {v:.1f}" for s, v in l0.items()))
    print(f"max |logits(spliced) - logits(clean)| = {(spliced - clean).abs().max().item():.2e}")
