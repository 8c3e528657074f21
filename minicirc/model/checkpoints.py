"""Checkpoints: the family registry (config.json's model_type -> config mapping, model class, weight-name
table), reading and checking Hugging Face checkpoint directories and llama-architecture .gguf files, writing
checkpoints back, and the tokenizer. The families (gpt_neox.py, gpt2.py, llama.py) and the GGUF reader
import nothing from here."""
import json
import os
from dataclasses import dataclass

import torch

from .. import hub
from ..errors import MinicircError, read_json
from ..hashing import sha256_of
from . import gguf, gpt2, gpt_neox, llama


@dataclass
class Family:
    """How one config.json model_type is read: its config mapping, its model class, and its weight-name
    table (cfg, checkpoint keys) -> {minicirc name: checkpoint name}. Weights whose minicirc name ends in
    one of `transposed` are stored the other way round (GPT-2's Conv1D keeps (in, out))."""
    config_from_hf: object
    model: type
    hf_names: object
    transposed: tuple = ()


# config.json model_type -> how it is read; the one place that lists the supported families.
FAMILIES = {
    "gpt_neox": Family(gpt_neox.config_from_hf, gpt_neox.GPTNeoX, gpt_neox.hf_names),
    "gpt2": Family(gpt2.config_from_hf, gpt2.GPT2, gpt2.hf_names, gpt2.TRANSPOSED),
    **{t: Family(llama.config_from_hf, llama.Llama, llama.hf_names) for t in llama.MODEL_TYPES},
}


def family(model_type):
    """The Family for a config.json model_type (None: GPT-NeoX, the original's model)."""
    fam = FAMILIES.get("gpt_neox" if model_type is None else model_type)
    if fam is None:
        raise MinicircError(f"config.json: model_type {model_type!r} is not supported "
                            f"(supported: {', '.join(FAMILIES)})")
    return fam


def _read_file(path):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:
            raise MinicircError(f"{path}: cannot read safetensors file ({e})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MinicircError(f"{path}: cannot load with weights_only=True ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); refusing to unpickle arbitrary code") from None


def read_state_dict(model_dir):
    """All tensors of a checkpoint directory: model.safetensors, pytorch_model.bin, or shards listed by
    model.safetensors.index.json / pytorch_model.bin.index.json (every shard it names must be there)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(model_dir, name)):
            return _read_file(os.path.join(model_dir, name))
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(model_dir, name)
        if not os.path.exists(index):
            continue
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise MinicircError(f"{index}: no weight_map")
        shards = sorted(set(weight_map.values()))
        missing = [f for f in shards if not os.path.exists(os.path.join(model_dir, f))]
        if missing:
            raise MinicircError(f"{index} names {len(missing)} shard files that are not there, e.g. {missing[0]}")
        state = {}
        for f in shards:
            state.update(_read_file(os.path.join(model_dir, f)))
        return state
    raise MinicircError(f"{model_dir}: no model.safetensors or pytorch_model.bin")


def build_model(fam, cfg, state, where):
    """A model of family `fam` holding the checkpoint tensors `state` (Hugging Face names), after checking
    that every tensor the name table wants is there, has the shape cfg implies and is finite."""
    with torch.device("cpu"):   # weights are read and checked on the CPU, then moved in one go
        model = fam.model(cfg)
    names = fam.hf_names(cfg, set(state))
    missing = [hf_name for hf_name in names.values() if hf_name not in state]
    if missing:
        raise MinicircError(f"{where}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    own = model.state_dict()
    new = {}
    for name, hf_name in names.items():
        t = state[hf_name]
        if name.endswith(fam.transposed):
            t = t.t()
        if t.shape != own[name].shape:
            raise MinicircError(f"{where}: {hf_name} has shape {tuple(t.shape)}, config implies {tuple(own[name].shape)}")
        if not torch.isfinite(t).all():
            raise MinicircError(f"{where}: {hf_name} contains NaN or inf")
        new[name] = t.float()
    model.load_state_dict(new, strict=False)  # strict=False: non-persistent buffers and tied unembeddings
    return model


def load_gguf(path):
    """A llama.py Llama (float32, CPU) from a llama-architecture GGUF file: gguf.py reads it as a Hugging Face
    config dict and state dict, then it is built like any checkpoint."""
    hf, state, rope_factors = gguf.read_gguf(path)
    cfg = llama.config_from_hf(hf)
    cfg.rope_freq_factors = rope_factors
    return build_model(FAMILIES["llama"], cfg, state, os.fspath(path))


def local_checkpoint(path):
    """`path`, or the local copy of a Hugging Face Hub id (hub.local_path): its json files (config, tokenizer)
    and safetensors weights, or its pytorch_model*.bin files where it has no safetensors."""
    local = hub.local_path(path, ("*.json", "*.safetensors"))
    if local != path and os.path.isdir(local) and not any(n.endswith(".safetensors") for n in os.listdir(local)):
        local = hub.local_path(path, ("*.json", "pytorch_model*.bin"))
    return local


def load_model(path, device="cpu", dtype=torch.float32):
    """Read a Hugging Face checkpoint directory (family from config.json's model_type) or a llama-
    architecture .gguf file into a model in eval mode; either may be a Hugging Face Hub id
    (owner/repo[/path/in/repo]) where no such local path exists."""
    path = local_checkpoint(os.fspath(path))
    if path.endswith(".gguf"):
        return load_gguf(path).to(device=device, dtype=dtype).eval()
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise MinicircError(f"model directory {path} does not exist")
    if not os.path.exists(cfg_path):
        raise MinicircError(f"{path}: config.json is missing")
    hf = read_json(cfg_path)
    fam = family(hf.get("model_type"))
    cfg = fam.config_from_hf(hf)
    model = build_model(fam, cfg, read_state_dict(path), path)
    return model.to(device=device, dtype=dtype).eval()


def save_model(model, model_dir):
    """Write config.json + model.safetensors in the Hugging Face layout of the model's family."""
    from safetensors.torch import save_file
    hf = model.cfg.to_hf()
    os.makedirs(model_dir, exist_ok=True)
    fam = family(hf.get("model_type"))
    own = model.state_dict()
    tensors = {}
    for name, hf_name in fam.hf_names(model.cfg).items():
        t = own[name].detach().cpu()
        tensors[hf_name] = (t.t() if name.endswith(fam.transposed) else t).contiguous()
    save_file(tensors, os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)


def load_tokenizer(model_dir):
    """The `tokenizers.Tokenizer` stored as model_dir/tokenizer.json, or built from a .gguf file's metadata
    (either may be a Hugging Face Hub id, as in load_model)."""
    from tokenizers import Tokenizer
    model_dir = hub.local_path(os.fspath(model_dir), ("tokenizer.json",))
    if model_dir.endswith(".gguf"):
        return gguf.load_gguf_tokenizer(model_dir)
    path = os.path.join(os.fspath(model_dir), "tokenizer.json")
    if not os.path.exists(path):
        raise MinicircError(f"{model_dir}: tokenizer.json is missing")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:
        raise MinicircError(f"{path}: cannot read tokenizer ({e})") from None


def model_hash(model):
    """sha256 over the weights, recorded in circuit.json so a circuit is never applied to another model."""
    return sha256_of(part for name, t in sorted(model.state_dict().items()) for part in (name, t))
