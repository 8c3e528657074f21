"""Hugging Face Hub ids wherever minicirc reads a model or dictionaries from a path, as transformers and
SAELens accept them: `owner/repo` (the whole repository) or `owner/repo/path/in/repo` (a folder or a file
inside it). A string is read as an id only where no such local file or folder exists; the files come from
the Hugging Face cache (HF_HUB_CACHE, HF_HOME), downloaded into it first unless HF_HUB_OFFLINE is set.
Needs the optional package huggingface_hub (`pip install huggingface_hub`, or minicirc[hub]).
"""
import os
import re

from .errors import MinicircError

# owner/repo[/path/in/repo]; an absolute path, ./ or ../ never is one.
HUB_ID = re.compile(r"([A-Za-z0-9][\w.-]*/[\w.-]+)(?:/([^/].*))?")


def split_id(path):
    """(repo id, path inside the repo or "") of a hub id, or None for a string that cannot be one."""
    m = HUB_ID.fullmatch(path)
    if m is None or path.startswith(("./", "../")) or ".." in path.split("/"):
        return None
    return m.group(1), (m.group(2) or "").rstrip("/")


def _offline(constants):
    # is_offline_mode() in recent versions of huggingface_hub; HF_HUB_OFFLINE, read at import, in all.
    return bool(constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE)


def local_path(path, files=None):
    """`path` itself where it exists on disk (or is no hub id: the caller says it does not exist); else the
    local copy of the hub id `path`: the repository's files matching `files` (fnmatch patterns relative to
    the path inside the repo; None: every file), or the one file that path names. Returns the local folder
    or file the id names inside the cached snapshot."""
    path = os.fspath(path)
    parts = None if os.path.exists(path) else split_id(path)
    if parts is None:
        return path
    repo, sub = parts
    try:    # optional: only hub ids need it
        import huggingface_hub.constants as constants
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MinicircError(f"{path}: no such file or folder; to read it as a Hugging Face Hub id, install "
                            "huggingface_hub (pip install huggingface_hub)") from None
    patterns = list(files) if files is not None else None
    if sub:     # a file `sub`, or the files under the folder `sub`
        patterns = [sub] + [f"{sub}/{p}" for p in patterns or ["*"]]
    offline = _offline(constants)
    get = f"hf download {repo}" + (f" --include '{sub}/*'" if sub else "")
    try:
        root = snapshot_download(repo, allow_patterns=patterns)
    except Exception as e:   # not found, gated, no network: the exception classes differ between versions
        if offline:
            raise MinicircError(f"{path}: no such file or folder, and Hugging Face Hub repository {repo} is not in "
                                f"the cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: "
                                f"download it first where there is network ({get})") from None
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MinicircError(f"{path}: no such file or folder, and not readable as a Hugging Face Hub id "
                            f"({type(e).__name__}: {why})") from None
    local = os.path.join(root, sub) if sub else root
    if not os.path.exists(local):
        raise MinicircError(f"{path}: Hugging Face Hub repository {repo} has no file or folder {sub}"
                            + (f" in the cache, and HF_HUB_OFFLINE is set: download it first ({get})" if offline else ""))
    return local
