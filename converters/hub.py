"""Resolve a model name (chatglm3-6b, glm-4-9b-chat, ...) to a local checkpoint directory.

Looks in the Hugging Face and ModelScope caches; downloads only when `huggingface_hub` is installed
and the network works. Offline, one line says what was looked for and how to fetch it.
"""

from __future__ import annotations

import os
from pathlib import Path

from lowvram.known import KNOWN


def _hf_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def cached(repo: str) -> Path | None:
    snaps = _hf_cache() / f"models--{repo.replace('/', '--')}" / "snapshots"
    for snap in sorted(snaps.glob("*"), key=lambda p: p.stat().st_mtime, reverse=True) if snaps.exists() else []:
        if (snap / "config.json").exists():
            return snap
    ms = Path(os.environ.get("MODELSCOPE_CACHE", Path.home() / ".cache" / "modelscope" / "hub"))
    for cand in (ms / repo, ms / "models" / repo, ms / repo.replace(".", "___")):
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
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo))
    except ImportError:
        pass
    except Exception as e:  # offline, no such repo, auth
        raise FileNotFoundError(
            f"{source}: not in the local cache ({_hf_cache()}) and the download failed ({type(e).__name__}); "
            f"fetch it with: huggingface-cli download {repo}") from None
    raise FileNotFoundError(f"{source}: not in the local cache ({_hf_cache()}); fetch it with "
                            f"`pip install huggingface_hub && huggingface-cli download {repo}`, or pass a directory")
