"""EleutherAI sparsify folders (`<hookpoint>/cfg.json` + `<hookpoint>/sae.safetensors`): SAEs, SAEs with a
skip term, transcoders and skip transcoders, with top-k or groupmax activations, read into Dictionary with
the library's own math (sparsify 1.3's SparseCoder.encode / decode / forward):

    s = x - b_dec for an SAE, x for a transcoder (which reads the module's input)
    f = topk or groupmax of relu(s @ encoder.weight.T + encoder.bias)   (k latents, or k groups)
    output = f @ W_dec + b_dec + x @ W_skip.T                         (the skip term only with skip_connection)

`num_latents: 0` means d_in * expansion_factor. The decoder is never renormalised (normalize_decoder is a
training flag): feature values are the library's. The folder's name is the hookpoint, a module name under the
Hugging Face model's `base_model`, which says the site (hookpoint_site).
"""
import os
import re

from ..errors import MinicircError, read_json
from .dictionary import Dictionary, checked
from .formats import read_folder

# Keys only a sparsify cfg has, and keys only SAELens' have: a folder is read as what its files say it is.
SPARSIFY_KEYS = {"num_latents", "expansion_factor"}
SAELENS_KEYS = {"d_sae", "architecture", "hook_name", "hook_point", "metadata"}

# Module names of one layer's parts under each family's Hugging Face base_model, by minicirc model class:
# (the list of layers, the attention module, the base model's name in the *ForCausalLM model). The MLP is `mlp`
# in all of them. A hookpoint may name the module from the whole model (`model.layers.3.mlp`, as EleutherAI's
# SmolLM2-135M skip transcoders do): the same module.
FAMILY_MODULES = {"Llama": ("layers", "self_attn", "model"), "GPTNeoX": ("layers", "attention", "gpt_neox"),
                  "GPT2": ("h", "attn", "transformer")}
HOOKPOINT = re.compile(r"(?:(model|gpt_neox|transformer)\.)?(layers|h)\.(\d+)(?:\.(self_attn|attention|attn|mlp))?")


def is_sparsify(folder):
    """Whether `folder` holds a sparsify dictionary: sae.safetensors (SAELens writes sae_weights.safetensors)
    and a cfg.json with sparsify's keys, not SAELens'. A folder that mixes the two is an error."""
    has_sparsify = os.path.exists(os.path.join(folder, "sae.safetensors"))
    has_saelens = os.path.exists(os.path.join(folder, "sae_weights.safetensors"))
    cfg_path = os.path.join(folder, "cfg.json")
    keys = set(read_json(cfg_path)) if os.path.exists(cfg_path) else set()
    if not has_sparsify:
        if has_saelens and keys & SPARSIFY_KEYS and not keys & SAELENS_KEYS:
            raise MinicircError(f"{cfg_path}: a sparsify cfg.json beside SAELens' sae_weights.safetensors "
                                "(sparsify writes sae.safetensors); not a dictionary minicirc can tell apart")
        return False
    if has_saelens:
        raise MinicircError(f"{folder}: holds both sae.safetensors (sparsify) and sae_weights.safetensors "
                            "(SAELens); keep one dictionary per folder")
    if keys & SAELENS_KEYS or not keys & SPARSIFY_KEYS:
        raise MinicircError(f"{cfg_path}: sae.safetensors is sparsify's file, but this cfg.json is not sparsify's "
                            f"(it has {sorted(keys & SAELENS_KEYS) or 'no num_latents or expansion_factor'})")
    return True


def hookpoint_parts(hookpoint):
    """(layers list name, layer, module) of a hookpoint, module None for the whole layer; None if it names
    no module minicirc places."""
    m = HOOKPOINT.fullmatch(hookpoint)
    return None if m is None else (m.group(2), int(m.group(3)), m.group(4))


def hookpoint_site(hookpoint, transcoder=False):
    """The site a sparsify hookpoint's dictionary writes: `layers.L` (GPT-2: `h.L`), the decoder layer's
    output, is resid_L; its attention module (`self_attn`, `attention`, `attn`) attn_L; `mlp` mlp_L. A
    transcoder reads the module's input and writes its output: minicirc places those at an MLP only."""
    parts = hookpoint_parts(hookpoint)
    if parts is None:
        raise MinicircError(f"hookpoint {hookpoint!r} names no module minicirc knows (layers.L, layers.L.self_attn, "
                            "layers.L.attention, layers.L.mlp; GPT-2: h.L, h.L.attn, h.L.mlp; each also after "
                            "model., gpt_neox. or transformer.)")
    _, layer, module = parts
    if transcoder and module != "mlp":
        raise MinicircError(f"hookpoint {hookpoint!r}: a transcoder there maps the module's input to its output, "
                            "and minicirc places transcoders only at an MLP (layers.L.mlp, GPT-2: h.L.mlp)")
    kind = "resid" if module is None else "mlp" if module == "mlp" else "attn"
    return f"{kind}_{layer}"


def hookpoint_problem(sae, model):
    """None if the hookpoint sae.hookpoint names a module of `model`'s family whose value is the site's, else
    why not (load_saes asks, as only the model knows its family)."""
    if getattr(sae, "hookpoint", None) is None:
        return None
    family = FAMILY_MODULES.get(type(model).__name__)
    layers, layer, module = hookpoint_parts(sae.hookpoint)
    if family is None:
        return f"{sae.source}: minicirc does not know the module names of a {type(model).__name__} model"
    prefix = HOOKPOINT.fullmatch(sae.hookpoint).group(1)
    if layers != family[0] or module not in (None, "mlp", family[1]) or prefix not in (None, family[2]):
        names = f"{family[0]}.L, {family[0]}.L.{family[1]}, {family[0]}.L.mlp, each also after {family[2]}."
        return f"{sae.source}: hookpoint {sae.hookpoint} names no module of this {type(model).__name__} model ({names})"
    if module is not None and getattr(model.cfg, "gemma", False):
        return (f"{sae.source}: hookpoint {sae.hookpoint} is the module's own output, which Gemma-2 normalises "
                f"again before it joins the residual stream: no minicirc site holds it")
    if layer >= model.cfg.n_layers:
        return f"{sae.source}: hookpoint {sae.hookpoint} is past this model's {model.cfg.n_layers} layers"
    return None


def load_sparsify(folder):
    """A sparsify folder -> Dictionary (kind topk or groupmax; W_skip with skip_connection; a transcoder reads
    its MLP's input, `reads="mlp_in"`). Any stored dtype is read as float32. The site comes from the folder's
    name when it is a hookpoint (sae.hookpoint, sae.site), else it is left to the caller."""
    folder = os.fspath(folder).rstrip(os.sep)
    cfg_path, w_path, cfg, w = read_folder(folder, "sae.safetensors", "sparsify")
    activation = cfg.get("activation", "topk")
    if activation not in ("topk", "groupmax"):
        raise MinicircError(f"{cfg_path}: activation {activation!r} is not supported (topk, groupmax)")
    transcode, skip = bool(cfg.get("transcode", False)), bool(cfg.get("skip_connection", False))
    names = ["encoder.weight", "encoder.bias", "W_dec", "b_dec"] + (["W_skip"] if skip else [])
    missing = [k for k in names if k not in w]
    if missing:
        raise MinicircError(f"{w_path}: sparsify file lacks {missing} (has {sorted(w)})")
    d_in = cfg.get("d_in", w["b_dec"].shape[0])
    n = cfg.get("num_latents") or d_in * cfg.get("expansion_factor", 0)
    if tuple(w["encoder.weight"].shape) != (n, d_in):
        raise MinicircError(f"{w_path}: encoder.weight has shape {tuple(w['encoder.weight'].shape)}, cfg.json says "
                            f"({n}, {d_in}) (num_latents, or d_in x expansion_factor when it is 0)")
    hookpoint = os.path.basename(folder)
    try:
        site = hookpoint_site(hookpoint, transcode) if hookpoint_parts(hookpoint) else None
    except MinicircError as e:
        raise MinicircError(f"{folder}: {e}") from None
    if site is None and transcode:
        raise MinicircError(f"{folder}: a transcoder's folder must be named by its hookpoint (e.g. layers.3.mlp): "
                            "the name says which MLP it replaces")
    sae = Dictionary(w["encoder.weight"].float().T, w["encoder.bias"], w["W_dec"], w["b_dec"], activation,
                     k=cfg.get("k"), subtract_b_dec=not transcode, source=folder, site=site,
                     W_skip=w["W_skip"] if skip else None, reads="mlp_in" if transcode else None)
    sae.hookpoint = hookpoint if site else None
    return checked(sae)
