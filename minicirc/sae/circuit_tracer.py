"""circuit-tracer per-layer transcoder sets: a folder with `config.yaml` and `layer_<i>.safetensors` (i the
layer), read into Dictionary with the library's own math (circuit-tracer 0.5's SingleLayerTranscoder):

    pre = x @ W_enc.T + b_enc                       (W_enc (F, d); no b_dec subtraction)
    f = pre * (pre > activation_function.threshold)   (JumpReLU, where the file holds a threshold), else relu(pre)
    output = f @ W_dec + b_dec + x @ W_skip.T         (the skip term where the file holds W_skip)

Files may be stored in any float dtype; they are read as float32. config.yaml's `feature_input_hook` and
`feature_output_hook` are TransformerLens hook names relative to `blocks.{layer}.` and decide what the
transcoder reads and where it writes (HOOK_INPUTS, HOOK_OUTPUTS). config.yaml is read as flat YAML (the
top-level `key: value` scalars; nested blocks such as the `transcoders:` list of a Hub config are skipped):
never executed.

Cross-layer transcoders (`model_kind: cross_layer_transcoder`, circuit-tracer 0.5's CrossLayerTranscoder, read
as its load_clt reads them): `W_enc_<i>.safetensors` holds `W_enc_<i>` (F, d), `b_enc_<i>`, `b_dec_<i>` (the
decoder bias of target layer i) and `threshold_<i>` (JumpReLU; else ReLU); `W_dec_<i>.safetensors` holds
`W_dec_<i>` (F, n_layers - i, d), the writes of layer i's features to layers i..n_layers-1. The layer count is
the number of W_enc files (as the library counts it). Loaded as one sae.clt.CrossLayerDictionary per layer.
"""
import os
import re

import torch

from ..errors import MinicircError
from .clt import CrossLayerDictionary
from .dictionary import Dictionary, checked
from .formats import read_safetensors

# What each input hook reads, as Dictionary.reads: mlp.hook_in is what the MLP's first projection reads (after
# the norm; for Gemma-2 the pre-feedforward norm's output), hook_resid_mid the residual before that norm.
HOOK_INPUTS = {"mlp.hook_in": "mlp_in", "hook_resid_mid": "resid_mid"}
# Output hooks: hook_mlp_out is site mlp_L in every family; mlp.hook_out is the MLP module's own output, the
# same value except in Gemma-2, which normalises it again (post_feedforward_layernorm) before the site.
HOOK_OUTPUTS = ("mlp.hook_out", "hook_mlp_out")
LAYER_FILE = re.compile(r"layer_(\d+)\.safetensors")
CLT_FILE = re.compile(r"W_enc_(\d+)\.safetensors")
YAML_LINE = re.compile(r"([A-Za-z_][\w.-]*)\s*:\s*(.*)")


def read_flat_yaml(path):
    """{key: str} of the top-level `key: scalar` lines of a YAML file; indented lines, list items and keys
    that open a block (no value) are left out, quotes stripped, `#` comments dropped."""
    out = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MinicircError(f"{path}: cannot read ({e})") from None
    for line in lines:
        m = YAML_LINE.fullmatch(line.rstrip())
        if m is None:
            continue
        value = m.group(2)
        if value[:1] in ("'", '"'):
            value = value[1:value.find(value[0], 1)] if value.find(value[0], 1) > 0 else value[1:]
        else:
            value = value.split(" #")[0].strip()
        if value:
            out[m.group(1)] = value
    return out


def read_config(folder, cross_layer=False):
    """(input hook's `reads`, output hook) of a transcoder-set folder's config.yaml, each checked; a
    cross-layer transcoder's only with cross_layer (model_kind is read by config_kind)."""
    path = os.path.join(folder, "config.yaml")
    if not os.path.exists(path):
        raise MinicircError(f"{folder}: no config.yaml (circuit-tracer's transcoder folders name their hooks there)")
    cfg = read_flat_yaml(path)
    kind = cfg.get("model_kind", "transcoder_set")
    if kind == "cross_layer_transcoder" and not cross_layer:
        raise MinicircError(f"{path}: a cross-layer transcoder (each layer's features write to every later layer) "
                            "is a set of layers: load it with load_saes(folder, model)")
    if kind not in ("transcoder_set", "cross_layer_transcoder"):
        raise MinicircError(f"{path}: model_kind {kind!r} is not one circuit-tracer writes "
                            "(transcoder_set, cross_layer_transcoder)")
    hook_in, hook_out = cfg.get("feature_input_hook"), cfg.get("feature_output_hook")
    if hook_in not in HOOK_INPUTS:
        raise MinicircError(f"{path}: feature_input_hook {hook_in!r} is no value minicirc computes (known: "
                            f"{', '.join(HOOK_INPUTS)}; ln2.hook_normalized, the norm's value before its weight, is not one)")
    if hook_out not in HOOK_OUTPUTS:
        raise MinicircError(f"{path}: feature_output_hook {hook_out!r} is no site minicirc has (known: {', '.join(HOOK_OUTPUTS)})")
    return HOOK_INPUTS[hook_in], hook_out


def load_transcoder(path, reads, output_hook):
    """One `layer_<i>.safetensors` -> Dictionary at site mlp_<i>, reading `reads` (see read_config)."""
    m = LAYER_FILE.fullmatch(os.path.basename(path))
    if m is None:
        raise MinicircError(f"{path}: circuit-tracer transcoder files are named layer_<i>.safetensors")
    w = read_safetensors(path)
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in w]
    if missing:
        raise MinicircError(f"{path}: circuit-tracer transcoder file lacks {missing} (has {sorted(w)})")
    thr = w.get("activation_function.threshold")
    # Thresholds are not clamped here: pre * (pre > t) with t < 0 lets small negative values through, as the
    # library does. Dictionary clamps thresholds at 0 (every SAE library applies relu first), so a negative
    # one would change f: refuse it instead.
    if thr is not None and bool((thr < 0).any()):
        raise MinicircError(f"{path}: a negative JumpReLU threshold passes negative features; not supported")
    sae = Dictionary(w["W_enc"].float().T, w["b_enc"], w["W_dec"], w["b_dec"], "jumprelu" if thr is not None else "relu",
                     threshold=thr, subtract_b_dec=False, source=path, site=f"mlp_{m.group(1)}",
                     W_skip=w.get("W_skip"), reads=reads)
    sae.output_hook = output_hook
    return checked(sae)


def layer_files(folder):
    """{layer: path} of the layer_<i>.safetensors files in a transcoder-set folder."""
    found = {int(m.group(1)): os.path.join(folder, name) for name in os.listdir(folder)
             if (m := LAYER_FILE.fullmatch(name))}
    if not found:
        raise MinicircError(f"{folder}: config.yaml but no layer_<i>.safetensors files")
    return dict(sorted(found.items()))


def is_cross_layer(folder):
    """Whether a folder with config.yaml holds a cross-layer transcoder (model_kind)."""
    path = os.path.join(folder, "config.yaml")
    return os.path.exists(path) and read_flat_yaml(path).get("model_kind") == "cross_layer_transcoder"


def load_transcoder_set(folder):
    """A circuit-tracer transcoder-set or cross-layer transcoder folder -> {site mlp_i: Dictionary}."""
    folder = os.fspath(folder)
    if is_cross_layer(folder):
        return load_clt(folder)
    reads, output_hook = read_config(folder)
    return {f"mlp_{layer}": load_transcoder(path, reads, output_hook) for layer, path in layer_files(folder).items()}


def load_clt(folder):
    """A circuit-tracer cross-layer transcoder folder -> {site mlp_i: CrossLayerDictionary}."""
    reads, output_hook = read_config(folder, cross_layer=True)
    found = sorted(int(m.group(1)) for name in os.listdir(folder) if (m := CLT_FILE.fullmatch(name)))
    n = len(found)
    if found != list(range(n)) or n == 0:
        raise MinicircError(f"{folder}: a cross-layer transcoder needs W_enc_0 .. W_enc_<n-1>.safetensors, found "
                            f"layers {found}")
    out = {}
    for i in range(n):
        enc_path, dec_path = (os.path.join(folder, f"{w}_{i}.safetensors") for w in ("W_enc", "W_dec"))
        if not os.path.exists(dec_path):
            raise MinicircError(f"{dec_path}: missing (each W_enc_<i>.safetensors has its W_dec_<i>.safetensors)")
        w = read_safetensors(enc_path)
        missing = [k for k in (f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}") if k not in w]
        if missing:
            raise MinicircError(f"{enc_path}: cross-layer transcoder file lacks {missing} (has {sorted(w)})")
        W_out = read_safetensors(dec_path).get(f"W_dec_{i}")
        F, d = w[f"W_enc_{i}"].shape
        if W_out is None or W_out.shape != (F, n - i, d):
            raise MinicircError(f"{dec_path}: W_dec_{i} should have shape ({F}, {n - i}, {d}) for layer {i} of {n}, "
                                f"got {None if W_out is None else tuple(W_out.shape)}")
        thr = w.get(f"threshold_{i}")
        if thr is not None and bool((thr < 0).any()):
            raise MinicircError(f"{enc_path}: a negative JumpReLU threshold passes negative features; not supported")
        sae = CrossLayerDictionary(w[f"W_enc_{i}"].float().T, w[f"b_enc_{i}"], W_out, w[f"b_dec_{i}"], i, n,
                                   kind="jumprelu" if thr is not None else "relu", threshold=thr,
                                   subtract_b_dec=False, source=enc_path, site=f"mlp_{i}", reads=reads)
        sae.output_hook = output_hook
        out[f"mlp_{i}"] = checked(sae)
        if not torch.isfinite(sae.W_out).all():
            raise MinicircError(f"{dec_path}: W_dec_{i} contains NaN or inf")
    return out


def transcoder_problem(sae, model):
    """None if a circuit-tracer transcoder fits `model` (its layer exists, what it reads and writes are values
    this family computes, its widths are the MLP's), else why not."""
    hook = getattr(sae, "output_hook", None)
    if hook is None:
        return None
    layer = int(sae.site.rsplit("_", 1)[1])
    n_clt = getattr(sae, "n_layers", None)
    if n_clt is not None and n_clt != model.cfg.n_layers:
        return (f"{os.path.dirname(sae.source) or '.'}: a cross-layer transcoder of {n_clt} layers "
                f"(W_enc_0 .. W_enc_{n_clt - 1}.safetensors), and this model has {model.cfg.n_layers} layers")
    if layer >= model.cfg.n_layers:
        return f"{sae.source}: a transcoder for layer {layer}, and this model has {model.cfg.n_layers} layers"
    if hook == "mlp.hook_out" and getattr(model.cfg, "gemma", False):
        return (f"{sae.source}: feature_output_hook mlp.hook_out is the MLP's own output, which Gemma-2 normalises "
                "again before site mlp_L (hook_mlp_out is that site)")
    if sae.reads == "resid_mid" and model.cfg.parallel_residual:
        return f"{sae.source}: feature_input_hook hook_resid_mid does not exist in a parallel-residual model"
    return None
