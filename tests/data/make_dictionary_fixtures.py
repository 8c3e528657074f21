"""Write the sparsify and circuit-tracer fixtures under tests/data/ with the libraries' own save code, and the
numbers the libraries' own code computes from them (tests/data/dictionary_refs.safetensors).

Runs only where eai-sparsify 1.3.3 and circuit-tracer 0.5.0 are installed (a throwaway environment, e.g.
`python3 -m venv /tmp/libvenv; pip install torch==2.13.0; pip install --no-deps eai-sparsify circuit-tracer`
plus the modules their imports need, with torch pinned), not in minicirc's own environment:

    python tests/data/make_dictionary_fixtures.py

Weights are random (decoder rows far from unit norm, biases far from 0, so a loader that renormalises, drops
b_dec or reads the wrong input differs); reference outputs are computed in float32 on fixed inputs.
"""
import os
import shutil
import tempfile

import huggingface_hub.constants
import torch
import yaml
from safetensors.torch import save_file

# circuit-tracer 0.5.0 imports a constant that huggingface_hub 1.x no longer has (it only reads it when
# downloading, which this script never does).
if not hasattr(huggingface_hub.constants, "HF_HUB_ENABLE_HF_TRANSFER"):
    huggingface_hub.constants.HF_HUB_ENABLE_HF_TRANSFER = False

import circuit_tracer
import sparsify
from circuit_tracer.utils.caching import get_cached_path, load_transcoders_from_cache
from sparsify import SparseCoder, SparseCoderConfig, TrainConfig
from circuit_tracer.transcoder.activation_functions import JumpReLU
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder
from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet

HERE = os.path.dirname(os.path.abspath(__file__))
D, N = 8, 16
refs = {}


def randomise(module, dtype):
    g = torch.Generator().manual_seed(sum(map(ord, repr(module.__class__))) + len(refs))
    with torch.no_grad():
        for name, p in module.named_parameters():
            # 0.4 * randn rows: norms ~1.1, never unit; biases off 0 (b_enc slightly positive: features fire)
            p.copy_((0.4 * torch.randn(p.shape, generator=g) + (0.3 if "bias" in name or "b_enc" in name else 0.0))
                    .to(p.dtype))
            if name.endswith("threshold"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)
    return module.to(dtype)


def inputs(name):
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(6, D, generator=g) * 1.5 + 0.2


# --- sparsify: a Llama-named run and a GPT-2-named run --------------------------------------------------

def sparsify_run(run, hookpoints):
    """hookpoints: {hookpoint: (SparseCoderConfig, stored dtype)}; saved with the library's save_to_disk,
    read back with its load_from_disk, and each one's features, decode and skip term recorded."""
    root = os.path.join(HERE, run)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    cfg_any = next(iter(hookpoints.values()))[0]
    TrainConfig(sae=cfg_any, hookpoints=list(hookpoints), log_to_wandb=False).save_json(os.path.join(root, "config.json"))
    loaded = SparseCoder.load_many(root, local=True)
    assert not loaded  # config.json alone: nothing to load yet
    for hookpoint, (cfg, dtype) in hookpoints.items():
        randomise(SparseCoder(D, cfg), dtype).save_to_disk(os.path.join(root, hookpoint))
    for hookpoint, sae in SparseCoder.load_many(root, local=True).items():
        sae = sae.float()  # the library's math in float32 on the stored values
        x = inputs(run + hookpoint)
        with torch.no_grad():
            acts, idx, _ = sae.encode(x)
            f = torch.zeros(len(x), sae.num_latents).scatter(-1, idx, acts)
            key = f"{run}/{hookpoint}"
            refs[f"{key}.x"], refs[f"{key}.features"] = x, f
            refs[f"{key}.decode"] = sae.decode(acts, idx)
            refs[f"{key}.out"] = sae(x).sae_out
            if sae.W_skip is not None:
                refs[f"{key}.skip"] = x @ sae.W_skip.mT


sparsify_run("sparsify_llama", {
    # num_latents 0: d_in * expansion_factor latents
    "layers.1": (SparseCoderConfig(k=3, num_latents=0, expansion_factor=2, normalize_decoder=False), torch.float32),
    "layers.0.self_attn": (SparseCoderConfig(activation="groupmax", k=4, num_latents=N, skip_connection=True), torch.float32),
    "layers.1.mlp": (SparseCoderConfig(k=4, num_latents=N, transcode=True, skip_connection=True), torch.bfloat16),
})
sparsify_run("sparsify_gpt2", {
    "h.0": (SparseCoderConfig(k=2, num_latents=N), torch.float32),
    "h.1.mlp": (SparseCoderConfig(activation="groupmax", k=2, num_latents=N, transcode=True), torch.float32),
})


# --- circuit-tracer: per-layer transcoder sets, written as its cache writes them ------------------------

def transcoder_set(name, input_hook, output_hook, jump, skip, dtype, n_layers=2):
    """A TranscoderSet saved with the library's to_safetensors and a config.yaml as its cache writes it, read
    back with load_transcoders_from_cache; per layer: features, decode (with the skip term), skip."""
    tmp = tempfile.mkdtemp()
    path = get_cached_path(name, tmp)
    layers = {}
    for l in range(n_layers):
        act = JumpReLU(torch.zeros(N), 0.1) if jump else torch.relu
        layers[l] = randomise(SingleLayerTranscoder(D, N, act, l, skip_connection=skip, device="cpu",
                                                    dtype=torch.float32), dtype)
    TranscoderSet(layers, input_hook, output_hook).to_safetensors(str(path))
    with open(path / "config.yaml", "w") as f:
        yaml.dump({"model_kind": "transcoder_set", "feature_input_hook": input_hook,
                   "feature_output_hook": output_hook, "scan": name}, f)
    loaded, _ = load_transcoders_from_cache(name, tmp, device=torch.device("cpu"), dtype=torch.float32,
                                            lazy_decoder=False)
    for l, tc in enumerate(loaded):
        x = inputs(f"{name}{l}")
        with torch.no_grad():
            f = tc.encode(x)
            key = f"{name}/layer_{l}"
            refs[f"{key}.x"], refs[f"{key}.features"] = x, f
            refs[f"{key}.out"] = tc.decode(f, x)
            if tc.W_skip is not None:
                refs[f"{key}.skip"] = tc.compute_skip(x)
    out = os.path.join(HERE, name)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(path, out)
    shutil.rmtree(tmp)


transcoder_set("ct_jumprelu_skip", "mlp.hook_in", "mlp.hook_out", jump=True, skip=True, dtype=torch.float32)
transcoder_set("ct_relu_bf16", "hook_resid_mid", "hook_mlp_out", jump=False, skip=False, dtype=torch.bfloat16)


def cross_layer_transcoder(name, input_hook, output_hook, jump, dtype, n_layers=2):
    """A CrossLayerTranscoder saved with the library's to_safetensors and a config.yaml as its cache writes it,
    read back with load_transcoders_from_cache (its load_clt); on inputs x (n_layers, positions, d): every
    layer's features (encode) and the reconstruction of every layer's MLP output (decode)."""
    tmp = tempfile.mkdtemp()
    path = get_cached_path(name, tmp)
    clt = CrossLayerTranscoder(n_layers, N, D, activation_function="jump_relu" if jump else "relu",
                               lazy_decoder=False, device="cpu", dtype=torch.float32)
    randomise(clt, torch.float32)
    if jump:
        with torch.no_grad():
            clt.activation_function.threshold.copy_(torch.rand(clt.activation_function.threshold.shape,
                                                               generator=torch.Generator().manual_seed(5)) * 0.5)
    clt.to(dtype).to_safetensors(str(path))
    with open(path / "config.yaml", "w") as f:
        yaml.dump({"model_kind": "cross_layer_transcoder", "feature_input_hook": input_hook,
                   "feature_output_hook": output_hook, "scan": name}, f)
    loaded, _ = load_transcoders_from_cache(name, tmp, device=torch.device("cpu"), dtype=torch.float32)
    x = torch.stack([inputs(f"{name}{l}") for l in range(n_layers)])
    with torch.no_grad():
        f = loaded.encode(x)
        refs[f"{name}.x"], refs[f"{name}.features"] = x, f
        refs[f"{name}.out"] = loaded.decode(f)
    out = os.path.join(HERE, name)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(path, out)
    shutil.rmtree(tmp)


cross_layer_transcoder("ct_clt_jumprelu", "mlp.hook_in", "hook_mlp_out", jump=True, dtype=torch.float32)
cross_layer_transcoder("ct_clt_relu_bf16", "hook_resid_mid", "mlp.hook_out", jump=False, dtype=torch.bfloat16, n_layers=3)

save_file({k: v.float().contiguous() for k, v in refs.items()}, os.path.join(HERE, "dictionary_refs.safetensors"),
          metadata={"sparsify": sparsify.__version__, "circuit_tracer": circuit_tracer.__version__,
                    "torch": torch.__version__})
print(f"wrote {len(refs)} reference tensors (sparsify {sparsify.__version__}, circuit-tracer {circuit_tracer.__version__})")
