"""A model's set of dictionaries: one dictionary from a path (load_sae), {site: dictionary} from a folder in
any of its layouts (load_saes), written back as the original code's tree (save_saes), and the hash that
names a set in caches (saes_hash).
"""
import os
import re

from .. import hub
from ..errors import MinicircError, read_json
from ..hashing import sha256_of
from ..model.sites import site_kind, site_layer, width_name
from .circuit_tracer import (
    LAYER_FILE,
    layer_files,
    load_transcoder,
    load_transcoder_set,
    read_config,
    transcoder_problem,
)
from .dictionary import shift_input
from .formats import cfg_hook_site, load_dictionary_learning, load_gemma_scope, load_saelens, save_dictionary_learning
from .sparsify import hookpoint_problem, hookpoint_site, is_sparsify, load_sparsify


def _candidates(folder):
    """Dictionary files directly in `folder` or one level deeper."""
    found = []
    for d in [folder] + sorted(os.path.join(folder, s) for s in os.listdir(folder)
                                if os.path.isdir(os.path.join(folder, s))):
        for name in ("ae.pt", "params.npz"):
            if os.path.exists(os.path.join(d, name)):
                found.append(os.path.join(d, name))
        if os.path.exists(os.path.join(d, "cfg.json")):
            found.append(d)
    return found


def _one_transcoder(path):
    """A circuit-tracer `layer_<i>.safetensors`, or a transcoder-set folder holding one."""
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    reads, output_hook = read_config(folder)
    if os.path.isdir(path):
        files = layer_files(path)
        if len(files) > 1:
            raise MinicircError(f"{path}: a transcoder set of {len(files)} layers; load_saes(folder, model) loads "
                                "the set, load_sae one layer_<i>.safetensors")
        path = next(iter(files.values()))
    return load_transcoder(path, reads, output_hook)


def load_sae(path, norm_scaling_factor=None):
    """One dictionary: an `ae.pt`, a Gemma Scope `params.npz`, a SAELens or sparsify folder, a circuit-tracer
    `layer_<i>.safetensors` (config.yaml beside it), or a folder holding exactly one of those; any of them may
    be a Hugging Face Hub id (owner/repo/path/in/repo, hub.local_path) where no such local path exists.
    norm_scaling_factor: see load_saelens (SAELens expected_average_only_in only)."""
    path = hub.local_path(path)
    if not os.path.exists(path):
        raise MinicircError(f"dictionary path {path} does not exist")
    if os.path.isfile(path) and LAYER_FILE.fullmatch(os.path.basename(path)) or \
            os.path.isdir(path) and os.path.exists(os.path.join(path, "config.yaml")):
        return _one_transcoder(path)
    if os.path.isfile(path):
        if not path.endswith((".pt", ".npz")):
            raise MinicircError(f"{path}: expected an ae.pt file, a params.npz file or a SAELens folder (or a "
                                "sparsify folder, or a circuit-tracer layer_<i>.safetensors)")
        found = [path]
    else:
        found = _candidates(path)
        if not found:
            raise MinicircError(f"{path}: no dictionary here (no ae.pt, params.npz or cfg.json, not even one folder deeper)")
        if len(found) > 1:
            raise MinicircError(f"{path}: ambiguous, several dictionaries: {', '.join(found)}")
    if found[0].endswith(".pt"):
        return load_dictionary_learning(found[0])
    if found[0].endswith(".npz"):
        return load_gemma_scope(found[0])
    if is_sparsify(found[0]):
        return load_sparsify(found[0])
    return load_saelens(found[0], norm_scaling_factor)


SITE_FOLDERS = {"attn": "attn_out_layer", "mlp": "mlp_out_layer", "resid": "resid_out_layer",
                "resid_mid": "resid_mid_layer", "z": "z_layer", "mlp_hidden": "mlp_hidden_layer"}
SITE_FOLDER = re.compile(r"embed|(attn_out|mlp_out|resid_out|resid_mid|z|mlp_hidden)_layer\d+")


def site_folder(site):
    """Folder name of a site in the original code's dictionaries/ tree (resid_mid, z and mlp_hidden, which it
    does not have: same pattern)."""
    if site == "embed":
        return "embed"
    return SITE_FOLDERS[site_kind(site)] + str(site_layer(site))


def _place(sae, site, model, where):
    """Check that a dictionary found at `where` fits `site` of `model`: the site the file names (a hook name,
    a sparsify hookpoint, a circuit-tracer layer), that this model's family computes it, the width."""
    problem = hookpoint_problem(sae, model) or transcoder_problem(sae, model)
    if problem:
        raise MinicircError(problem)
    if sae.reads is not None and sae.d_in != model.cfg.d_model:
        raise MinicircError(f"{sae.source}: transcoder width {sae.d_in} does not match the MLP of layer "
                            f"{site_layer(site)} (reads and writes d_model {model.cfg.d_model})")
    if sae.site is not None and sae.site != site:
        why = (" (z is the concatenated head outputs before the output projection, attn the projected output: "
               "widths may agree, the values do not)" if {site_kind(sae.site), site_kind(site)} == {"z", "attn"} else "")
        raise MinicircError(f"{sae.source}: its hook_name reads site {sae.site}, but it sits in {where} for site {site}{why}")
    if sae.reads_z_minus_value_bias:
        value_bias = getattr(model, "value_bias", None)
        if value_bias is None:
            raise MinicircError(f"{sae.source}: trained through TransformerLens with fold_value_biases (its default), "
                                "this z dictionary reads z - b_V, and this model does not give its value biases "
                                "(model.value_bias(layer)); set fold_value_biases: false in the cfg only if that is "
                                "how it was trained")
        b_V = value_bias(site_layer(site))
        if b_V is not None and bool(b_V.any()):
            sae = shift_input(sae, b_V)
    if sae.d_in != model.site_width(site):
        raise MinicircError(f"{sae.source}: dictionary width {sae.d_in} does not match the model's {width_name(site)} "
                            f"{model.site_width(site)} (site {site})")
    return sae


def load_saes(sae_dir, model, norm_scaling_factor=None):
    """{site: dictionary} from a folder of dictionaries, in one of three layouts:
    - the original code's dictionaries/ tree: one folder per site of the model (embed, attn_out_layer0, ...,
      see site_folder), each holding one dictionary; a SAELens cfg's hook_name must agree with its folder.
    - one SAELens folder per hook, named anything, each placed by its cfg's hook_name (see hook_site), or a
      sparsify run: one folder per hookpoint, named by it (see sparsify.hookpoint_site); sites without one
      get no dictionary. Folders holding a circuit-tracer set (config.yaml) may sit beside them, each placed
      as the next layout says: so transcoders and SAEs at other sites mix.
    - a circuit-tracer transcoder set (config.yaml + layer_<i>.safetensors): one transcoder per MLP site; or a
      cross-layer transcoder (config.yaml + W_enc_<i>, W_dec_<i>.safetensors): one layer of it per MLP site.
    sae_dir may be a Hugging Face Hub id (owner/repo or owner/repo/path/in/repo, hub.local_path) where no
    such local folder exists.
    norm_scaling_factor: a number, or {site: number}, for SAELens expected_average_only_in dictionaries."""
    sae_dir = hub.local_path(sae_dir)
    if not os.path.isdir(sae_dir):
        raise MinicircError(f"SAE directory {sae_dir} does not exist")
    if os.path.exists(os.path.join(sae_dir, "config.yaml")):
        return {site: _place(sae, site, model, f"folder {sae_dir}") for site, sae in load_transcoder_set(sae_dir).items()}
    factor = lambda site: norm_scaling_factor.get(site) if isinstance(norm_scaling_factor, dict) else norm_scaling_factor
    # Hidden folders are no dictionaries (`hf download --local-dir` leaves a .cache/ there).
    present = sorted(d for d in os.listdir(sae_dir) if os.path.isdir(os.path.join(sae_dir, d)) and not d.startswith("."))
    if present and not any(SITE_FOLDER.fullmatch(d) for d in present) and \
            all(any(os.path.exists(os.path.join(sae_dir, d, n)) for n in ("cfg.json", "config.yaml")) for d in present):
        return _load_hook_tree(sae_dir, present, model, factor)
    # Every site needs its folder; the optional sites (z_layerL, resid_mid_layerL, mlp_hidden_layerL) may have one.
    by_folder = {site_folder(s): s for s in model.all_sites}
    strangers = [d for d in present if d not in by_folder]
    if strangers:
        raise MinicircError(f"{sae_dir}: folders {strangers} match no site of this model "
                            f"({model.cfg.n_layers} layers): SAE tree and model do not belong together")
    missing = [site_folder(s) for s in model.sites if site_folder(s) not in present]
    if missing:
        raise MinicircError(f"{sae_dir}: no dictionary for {missing}")
    return {site: _place(load_sae(os.path.join(sae_dir, folder), factor(site)), site, model, f"folder {folder}")
            for folder, site in by_folder.items() if folder in present}


def _load_hook_tree(sae_dir, folders, model, factor):
    """load_saes' second layout: each SAELens folder placed at the site its cfg's hook names, each sparsify
    folder at the site its name (a hookpoint) names."""
    saes, origin = {}, {}
    for d in folders:
        if not os.path.exists(os.path.join(sae_dir, d, "cfg.json")):   # a circuit-tracer set (config.yaml)
            for site, sae in load_transcoder_set(os.path.join(sae_dir, d)).items():
                if site in saes:
                    raise MinicircError(f"{sae_dir}: two dictionaries for site {site}: {origin[site]} and {d}")
                saes[site], origin[site] = _place(sae, site, model, f"folder {d}"), d
            continue
        cfg_path = os.path.join(sae_dir, d, "cfg.json")
        sparsify = is_sparsify(os.path.join(sae_dir, d))
        if sparsify:
            try:
                hook, site = d, hookpoint_site(d, bool(read_json(cfg_path).get("transcode", False)))
            except MinicircError as e:
                raise MinicircError(f"{os.path.join(sae_dir, d)}: {e}") from None
        else:
            hook, site = cfg_hook_site(read_json(cfg_path), cfg_path)
        if hook is None:
            raise MinicircError(f"{cfg_path}: no hook_name, so the folder names no site")
        if site not in model.all_sites:
            kind = site_kind(site)
            has_kind = any(site_kind(s) == kind for s in model.all_sites if s != "embed")
            why = (f"this model has {model.cfg.n_layers} layers" if has_kind or site == "embed"
                   else f"this model has no {kind} sites (sites: {', '.join(model.all_sites)})")
            raise MinicircError(f"{cfg_path}: hook {hook} reads site {site}, and {why}")
        if site in saes:
            raise MinicircError(f"{sae_dir}: two dictionaries for site {site}: {origin[site]} and {d}")
        sae = load_sparsify(os.path.join(sae_dir, d)) if sparsify else load_saelens(os.path.join(sae_dir, d), factor(site))
        saes[site] = _place(sae, site, model, f"folder {d}")
        origin[site] = d
    return saes


def save_saes(saes, sae_dir):
    """Write {site: relu Dictionary} as a dictionary_learning tree."""
    for site, sae in saes.items():
        save_dictionary_learning(sae, os.path.join(sae_dir, site_folder(site)))


def saes_hash(saes):
    """sha256 of {site: dictionary}: sites, kinds and weights, in site order (what caches of results key on)."""
    parts = []
    for site in sorted(saes):
        sae = saes[site]
        parts += [site, sae.kind, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.threshold, str(sae.k)]
        # Whether b_dec is subtracted before encoding changes f unless b_dec is 0 (identity dictionaries).
        # Marked only then, so the hashes of dictionaries that subtract it stay what they were.
        if not sae.subtract_b_dec and bool(sae.b_dec.detach().any()):
            parts.append("|b_dec not subtracted")
        # Likewise what only newer kinds have is hashed only where present.
        if sae.kind == "gated":
            parts += [sae.W_gate, sae.b_gate]
        if sae.input_norm != "none":
            parts.append(f"|input_norm {sae.input_norm}")
        if sae.has_skip:
            parts.append(sae.W_skip)
        if sae.reads is not None:
            parts.append(f"|reads {sae.reads}")
        if hasattr(sae, "W_out"):       # a cross-layer transcoder's writes to the later layers
            parts.append(sae.W_out)
    return sha256_of(parts)
