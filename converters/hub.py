"""Resolve a model name (chatglm3-6b, glm-4-9b-chat, ...) to a local checkpoint directory.

Looks in the Hugging Face and ModelScope caches; downloads only when `huggingface_hub` or
`modelscope` is installed and the network works. Offline, one line says what was looked for and
how to fetch it.
"""

from __future__ import annotations

import os
from pathlib import Path

from lowvram.known import KNOWN

# THUDM's repos moved to zai-org on the Hugging Face hub (the old ids redirect); ModelScope uses ZhipuAI.
HF_OWNERS = ("THUDM", "zai-org")
MS_OWNERS = ("ZhipuAI", "THUDM", "zai-org")


def _hf_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def _ms_cache() -> Path:
    return Path(os.environ.get("MODELSCOPE_CACHE", Path.home() / ".cache" / "modelscope" / "hub"))


def cached(repo: str) -> Path | None:
    """A cached snapshot of `repo` (or its model name under another owner) that has a config.json."""
    name = repo.split("/")[-1]
    for owner in HF_OWNERS:
        snaps = _hf_cache() / f"models--{owner}--{name}" / "snapshots"
        for snap in sorted(snaps.glob("*"), key=lambda p: p.stat().st_mtime, reverse=True) if snaps.exists() else []:
            if (snap / "config.json").exists():
                return snap
    ms = _ms_cache()
    for owner in MS_OWNERS:
        for cand in (ms / owner / name, ms / "models" / owner / name, ms / owner / name.replace(".", "___")):
            if (cand / "config.json").exists():
                return cand
    return None


def resolve(source) -> Path:
    p = Path(source)
    if p.exists():
        return p
    key = str(source).lower().split("/")[-1]
    if key not in KNOWN:
        raise FileNotFoundError(f"{source}: no such directory, and not a known model name ({', '.join(KNOWN)})")
    repo = KNOWN[key]["repo"]
    hit = cached(repo)
    if hit:
        return hit
    name = repo.split("/")[-1]
    tried = []
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo))
    except ImportError:
        pass
    except Exception as e:  # offline, no such repo, auth
        tried.append(f"huggingface_hub: {type(e).__name__}")
    try:
        from modelscope import snapshot_download as ms_download

        return Path(ms_download(f"ZhipuAI/{name}"))
    except ImportError:
        pass
    except Exception as e:
        tried.append(f"modelscope: {type(e).__name__}")
    how = f"; download failed ({', '.join(tried)})" if tried else ""
    raise FileNotFoundError(
        f"{source}: looked for {repo} in {_hf_cache()} and ZhipuAI/{name} in {_ms_cache()}, not found{how}; "
        f"fetch it with `hf download {repo}` (pip install huggingface_hub; older versions: `huggingface-cli download`) or "
        f"`modelscope download ZhipuAI/{name}`, or pass a checkpoint directory")
