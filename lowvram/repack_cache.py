"""The native kernel's repacked weights, kept on disk between loads (CPU, Linux).

A GPTQ checkpoint stays in the standard layout (vLLM and transformers read it), so every load used to
repack it into the kernel's rows, quantize a float output layer to int8, and write the result into ~3 GB
of fresh memory (ChatGLM3-6B 4-bit), which the kernel must zero first: 6-14 s on a 2-vCPU VM. The first
load now writes what it built to one cache file; later loads map that file. The bytes stay in the page
cache (shared between processes, dropped and re-read under memory pressure instead of swapped, like
llama.cpp's mmap), and on kernels with large folios they are mapped with 2 MiB pages, as the anonymous
buffers were.

One file per checkpoint directory, keyed by the files' identity (name, size, mtime, inode, and samples of
their bytes), the kernel build and the load options that change what is built; a new key replaces the
directory's old file. `LOWVRAM_CACHE=0` turns it off, `LOWVRAM_CACHE_DIR` moves it (default
`$XDG_CACHE_HOME/lowvram` or `~/.cache/lowvram`); deleting the directory is always safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import shutil
import sys
from pathlib import Path

import torch

MAGIC = b"LVQCACHE"
FORMAT = 1
ALIGN = 64
MADV_POPULATE_READ = 22  # Linux 5.14+: map the file's pages now, read-only (no copy-on-write)


def enabled() -> bool:
    return (sys.platform.startswith("linux") and hasattr(mmap, "MAP_PRIVATE")
            and os.environ.get("LOWVRAM_CACHE", "1").lower() not in ("0", "false", "no", "off"))


def cache_dir() -> Path:
    if d := os.environ.get("LOWVRAM_CACHE_DIR"):
        return Path(d)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lowvram"


def _sample(f: Path, h) -> None:
    """The header and 16 spread 4 KiB pieces of a file: catches a rewrite within the mtime's granularity."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        h.update(fh.read(1 << 16))
        for i in range(16):
            fh.seek(size * i // 16)
            h.update(fh.read(4096))


def cache_path(ckpt_dir: Path, files, options: dict) -> Path | None:
    """Where the cache of this checkpoint and these options lives (it may not exist yet); None if off."""
    from .kernels import native

    if not enabled() or native.available() is not None:
        return None
    ckpt_dir = Path(ckpt_dir).resolve()
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, **options}, sort_keys=True, default=str).encode())
    with open(native._lib._name, "rb") as fh:  # the kernel build: its layout may change between versions
        h.update(hashlib.sha256(fh.read()).digest())
    extra = [ckpt_dir / n for n in ("config.json", "quantize_config.json") if (ckpt_dir / n).exists()]
    for f in sorted({Path(f) for f in files} | set(extra)):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode())
        _sample(f, h)
    where = hashlib.sha256(str(ckpt_dir).encode()).hexdigest()[:16]
    return cache_dir() / f"repacked-{where}-{h.hexdigest()[:16]}.lvq"


def _header(path: Path) -> tuple[dict, int] | None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
            if len(head) != 16 or head[:8] != MAGIC:
                return None
            n = int.from_bytes(head[8:], "little")
            index = json.loads(fh.read(n))
        if index.get("format") != FORMAT or path.stat().st_size != index["size"]:
            return None  # a file cut short would raise SIGBUS where a kernel reads past its end
        return index, 16 + n
    except (OSError, ValueError, KeyError):
        return None


def open_cache(path: Path | None) -> dict[str, dict] | None:
    """{module name: {tensor name: tensor}} mapped from a valid cache file, or None."""
    if path is None or not path.exists() or (found := _header(path)) is None:
        return None
    index, _ = found
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    for advice in (getattr(mmap, "MADV_HUGEPAGE", None), MADV_POPULATE_READ):
        if advice is not None:  # 2 MiB page-cache folios when read from disk; then every page mapped at once
            try:
                mm.madvise(advice)
            except OSError:  # older kernels: pages are mapped on first use instead
                pass
    buf = torch.frombuffer(mm, dtype=torch.uint8)  # keeps the mapping alive as long as any tensor views it
    out = {}
    for mod, tensors in index["modules"].items():
        out[mod] = {}
        for name, (off, dtype, shape) in tensors.items():
            dt = getattr(torch, dtype)
            n = dt.itemsize * int(torch.Size(shape).numel())
            out[mod][name] = buf[off : off + n].view(dt).view(shape)
        out[mod]["meta"] = index["meta"][mod]
    return out


def write_cache(path: Path, modules: dict[str, dict[str, torch.Tensor]], meta: dict[str, dict]) -> str:
    """Write the tensors of every module to `path` (a temporary file renamed at the end); a short status."""
    tensors, off = {}, 0
    for mod, ts in modules.items():
        tensors[mod] = {}
        for name, t in ts.items():
            off += -off % ALIGN
            tensors[mod][name] = (off, str(t.dtype).removeprefix("torch."), list(t.shape))
            off += t.numel() * t.element_size()
    index = {"format": FORMAT, "modules": tensors, "meta": meta, "size": 0}
    # the data start is aligned to 2 MiB in the file, so 2 MiB pages of the mapping hold whole pieces of it
    blob = json.dumps(index).encode()
    start = (16 + len(blob) + 64 + (2 << 20) - 1) // (2 << 20) * (2 << 20)
    for mod in tensors:
        for name, (o, dt, shape) in tensors[mod].items():
            tensors[mod][name] = (o + start, dt, shape)
    index["size"] = start + off
    blob = json.dumps(index).encode()
    assert 16 + len(blob) <= start
    d = path.parent
    tmp = d / f".{path.name}.{os.getpid()}.tmp"
    try:
        d.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(d).free < index["size"] + (1 << 30):
            return f"not written: {d} has less than {index['size'] / 2**30 + 1:.1f} GiB free"
        with open(tmp, "wb") as fh:
            fh.write(MAGIC + len(blob).to_bytes(8, "little") + blob)
            for mod, ts in modules.items():
                for name, t in ts.items():
                    fh.seek(tensors[mod][name][0])
                    fh.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
            fh.truncate(index["size"])
        # No fsync (it tripled the first load, 5 -> 17 s): after a crash, ext4 and xfs show a file whose data was
        # not yet written as shorter than its header says, and such a file is ignored (_header) and rewritten.
        for old in d.glob(path.name.rsplit("-", 1)[0] + "-*.lvq"):  # this checkpoint's stale caches
            old.unlink(missing_ok=True)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return f"not written: {e}"
    return f"written to {path} ({index['size'] / 2**30:.2f} GiB)"
