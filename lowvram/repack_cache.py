"""The native kernel's repacked weights, kept on disk between loads (CPU, Linux).

A GPTQ checkpoint stays in the standard layout (vLLM and transformers read it), so every load used to
repack it into the kernel's rows, quantize a float output layer to int8, and write the result into ~3 GB
of fresh memory (ChatGLM3-6B 4-bit): 3-14 s on a 2-vCPU VM, most of it the kernel providing 2 MiB pages.
Now the first load repacks straight into a cache file (a shared mapping of it: the page cache's large
folios were 3-5x quicker to get than anonymous 2 MiB pages here), and later loads map that file
privately. The bytes stay in the page cache (shared between processes, dropped and re-read under memory
pressure instead of swapped, like llama.cpp's mmap), mapped with 2 MiB pages on kernels with large folios.

A model larger than the page cache may hold dirty (halfway between vm.dirty_background_ratio and
vm.dirty_ratio of the available memory) is repacked into ordinary memory instead and written with O_DIRECT
from a thread of its own while the load goes on: through the page cache the kernel paused the loader at the
disk's buffered writeback speed (312 MB/s on this project's VM, against 1.4-1.7 GB/s direct), and the 5.7 GB
8-bit ChatGLM3-6B's first load took 26 s instead of 4.5.

One file per checkpoint directory, keyed by the files' identity (name, size, mtime, inode, and samples of
their bytes), the kernel build and the load options that change what is built; a new key replaces the
directory's old file, and a load that writes one removes those of checkpoint directories that are gone. `LOWVRAM_CACHE=0` turns it off, `LOWVRAM_CACHE_DIR` moves it (default
`$XDG_CACHE_HOME/lowvram` or `~/.cache/lowvram`); deleting the directory is always safe.

File: each linear's tensors one after another at 4 KiB-aligned offsets, then a JSON index, its length (8 bytes)
and MAGIC. (Tensors at 2 MiB-aligned offsets, as in format 2, left holes that the 2 MiB folios of a mapping
read in as zeros: 77 MiB of resident memory for 4-bit ChatGLM3-6B, whose 9 MiB qkv and 26.75 MiB down
projections are no multiples of 2 MiB.) Written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import mmap
import os
import queue
import shutil
import sys
import threading
from pathlib import Path

import torch

MAGIC = b"LVQCACHE"
FORMAT = 3
HUGE = 2 << 20
PAGE = max(4096, mmap.PAGESIZE)  # offsets in the file; O_DIRECT aligns memory, offsets and lengths to 512 or 4096
WRITE_CHUNK = 64 << 20
MADV_POPULATE_READ = 22  # Linux 5.14+: map the file's pages now, read-only (no copy-on-write)


def platform_ok() -> bool:
    return sys.platform.startswith("linux") and hasattr(mmap, "MAP_PRIVATE") and hasattr(os, "posix_fallocate")


def enabled() -> bool:
    return platform_ok() and os.environ.get("LOWVRAM_CACHE", "1").lower() not in ("0", "false", "no", "off")


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


@functools.lru_cache(maxsize=None)
def _kernel_digest(lib_file: str) -> bytes:
    """The kernel build, once per process: its layout may change between versions."""
    with open(lib_file, "rb") as fh:
        return hashlib.sha256(fh.read()).digest()


def wanted(on: bool | None = None) -> bool:
    """Whether a load keeps the cache (`on`=None: LOWVRAM_CACHE decides) and the native kernel is built to fill it."""
    from .kernels import native

    return (enabled() if on is None else on and platform_ok()) and native.available() is None


def cache_path(ckpt_dir: Path, files, options: dict) -> Path | None:
    """Where the cache of this checkpoint and these options lives (it may not exist yet); None without a cache
    directory. For loads that want() one: it reads samples of every file."""
    from .kernels import native

    ckpt_dir = Path(ckpt_dir).resolve()
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, **options}, sort_keys=True, default=str).encode())
    h.update(_kernel_digest(native._lib._name))
    extra = [ckpt_dir / n for n in ("config.json", "quantize_config.json") if (ckpt_dir / n).exists()]
    for f in sorted({Path(f) for f in files} | set(extra)):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode())
        _sample(f, h)
    where = hashlib.sha256(str(ckpt_dir).encode()).hexdigest()[:16]
    try:
        d = cache_dir()
    except (RuntimeError, KeyError):  # no LOWVRAM_CACHE_DIR, XDG_CACHE_HOME nor a home directory: no cache
        return None
    return d / f"repacked-{where}-{h.hexdigest()[:16]}.lvq"


def _index(path: Path, any_format: bool = False) -> dict | None:
    """The index of a complete cache file, or None (absent, cut short, not ours, another format unless any_format)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            fh.seek(size - 16)
            tail = fh.read(16)
            if len(tail) != 16 or tail[8:] != MAGIC:
                return None
            n = int.from_bytes(tail[:8], "little")
            fh.seek(size - 16 - n)
            index = json.loads(fh.read(n))
        if any_format and "format" in index:
            return index
        if index.get("format") != FORMAT or index["data_end"] + n + 16 != size:
            return None
        return index
    except (OSError, ValueError, KeyError):
        return None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _size(dtype: torch.dtype, shape) -> int:
    return dtype.itemsize * int(torch.Size(shape).numel())


def _view(buf: torch.Tensor, off: int, dtype: str, shape) -> torch.Tensor:
    dt = getattr(torch, dtype)
    return buf[off : off + _size(dt, shape)].view(dt).view(shape)


def _map(fd: int, length: int, flags: int, offset: int = 0) -> tuple[mmap.mmap, torch.Tensor]:
    """A mapping of a file and its bytes as a uint8 tensor (which keeps the mapping alive as long as any tensor
    views it), asking for 2 MiB page-cache folios (also when read from disk)."""
    mm = mmap.mmap(fd, length, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
    with contextlib.suppress(OSError, AttributeError):
        mm.madvise(mmap.MADV_HUGEPAGE)
    return mm, torch.frombuffer(mm, dtype=torch.uint8)


def open_cache(path: Path | None) -> dict[str, dict] | None:
    """{module name: {tensor name: tensor, "meta": sizes}} mapped from a complete cache file, or None."""
    if path is None or not path.exists() or (index := _index(path)) is None:
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # last use, for `lowvram cache`
    with open(path, "rb") as fh:
        mm, buf = _map(fh.fileno(), 0, mmap.MAP_PRIVATE)
    with contextlib.suppress(OSError, ValueError):  # the tensors' pages now (older kernels: on first use instead)
        mm.madvise(MADV_POPULATE_READ, 0, index["data_end"])  # they lie one after another, then the index
    out = {}
    for mod, tensors in index["modules"].items():
        out[mod] = {name: _view(buf, *spec) for name, spec in tensors.items()}
        out[mod]["meta"] = index["meta"][mod]
    return out


def dirty_headroom() -> int | None:
    """Bytes that may still be dirtied in the page cache before the kernel starts pausing writers: halfway
    between the background and the foreground dirty limits (vm.dirty_*_bytes, else vm.dirty_*_ratio of the
    available memory), less what is dirty or under writeback now. None where unknown."""
    try:
        mem = {k: int(v.split()[0]) << 10 for k, v in
               (line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())}
        vm = Path("/proc/sys/vm")

        def limit(name: str) -> int:
            return int((vm / f"{name}_bytes").read_text()) or int((vm / f"{name}_ratio").read_text()) * mem["MemAvailable"] // 100

        return (limit("dirty") + limit("dirty_background")) // 2 - mem["Dirty"] - mem["Writeback"]
    except (OSError, ValueError, KeyError):
        return None


def _pwrite_all(fd: int, buf: torch.Tensor, off: int) -> None:
    mv = memoryview(buf.numpy())
    at = 0
    while at < len(mv):
        at += os.pwrite(fd, mv[at : at + WRITE_CHUNK], off + at)


class _Writer:
    """Writes (buffer, offset) pairs in order from a thread of its own: the disk works while the loader
    repacks (os.pwrite and the kernel's C calls release the GIL)."""

    def __init__(self, fd: int):
        self.fd, self.error, self.cancelled = fd, None, False
        self.q: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="lowvram-cache-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while (item := self.q.get()) is not None:
            if self.error is None and not self.cancelled:
                try:
                    _pwrite_all(self.fd, *item)
                except OSError as e:
                    self.error = e

    def put(self, buf: torch.Tensor, off: int):
        if self.error is not None:
            raise self.error
        self.q.put((buf, off))

    def close(self, cancel: bool = False):
        """Wait for every write queued (or only the one under way, cancel=True); raises the first error."""
        self.cancelled |= cancel
        self.q.put(None)
        self.thread.join()
        if self.error is not None and not cancel:
            raise self.error


def _aligned(nbytes: int) -> torch.Tensor:
    """Fresh memory starting on a page (O_DIRECT's alignment), on 2 MiB pages where the kernel gives them."""
    from .kernels import native

    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8)
    buf = raw[-raw.data_ptr() % PAGE :][:nbytes]
    if (lib := native._load()) is not None:
        lib.lvq_hugepages(native._ptr(buf), nbytes)
    return buf


class Arena:
    """Buffers for a new cache file, so that a first load repacks straight into it: shared mappings of the
    file, or (direct=True, for models the page cache cannot hold dirty) page-aligned memory written to the
    file with O_DIRECT as each buffer is filled.

    alloc() falls back to ordinary memory once anything fails (no space, no mapping): the load goes on, and
    finish() then writes nothing."""

    def __init__(self, path: Path, need: int, checkpoint: Path | None = None, direct: bool | None = None):
        """need: about the bytes the file will take (the checkpoint's size); refused unless 1 GiB more is free.
        checkpoint: the directory it caches (recorded, so that a later write removes the caches of deleted ones).
        direct: None chooses by dirty_headroom()."""
        self.path = path
        self.checkpoint = None if checkpoint is None else str(Path(checkpoint).resolve())
        self.reserve = -(-(need + (64 << 20)) // HUGE) * HUGE  # one mapping of this length (only fallocated parts used)
        self.view = None
        self.tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"  # loads in two threads too
        self.regions: list[tuple[int, int, int]] = []  # (address, file offset, bytes)
        self.end = 0
        self.fd = None
        self.failed: str | None = None
        if direct is None:
            room = dirty_headroom()
            direct = room is not None and need > room
        self.direct = direct
        self.writer: _Writer | None = None
        self.pending: tuple[torch.Tensor, int] | None = None  # direct: the buffer handed out last, written when full
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(path.parent)
            _remove_orphans(path.parent)
            if shutil.disk_usage(path.parent).free < need + (1 << 30):
                self.failed = f"{path.parent} has less than {need / 2**30 + 1:.1f} GiB free"
                return
            flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC
            if direct:
                try:
                    self.fd = os.open(self.tmp, flags | getattr(os, "O_DIRECT", 0), 0o644)
                except OSError:  # tmpfs and some others refuse O_DIRECT: the same writes, buffered
                    self.fd = os.open(self.tmp, flags, 0o644)
                self.writer = _Writer(self.fd)
            else:
                self.fd = os.open(self.tmp, flags, 0o644)
        except OSError as e:
            self.failed = str(e)

    def _map(self, nbytes: int) -> tuple[torch.Tensor, int]:
        off = -(-self.end // PAGE) * PAGE
        size = -(-nbytes // PAGE) * PAGE
        if self.direct:
            self._flush()  # the buffer handed out before this one is complete: the loader fills one at a time
            buf = _aligned(size)
            buf[nbytes:].zero_()
            self.pending = (buf, off)
            buf = buf[:nbytes]
        else:
            os.posix_fallocate(self.fd, off, size)  # blocks reserved now: a full disk fails here, not as SIGBUS later
            if off + size <= self.reserve:  # one shared mapping of the whole file-to-be (one descriptor, one area)
                if self.view is None:
                    os.ftruncate(self.fd, max(os.fstat(self.fd).st_size, self.reserve))  # a hole; cut to size at the end
                    self.view = _map(self.fd, self.reserve, mmap.MAP_SHARED)[1]  # only fallocated parts are touched
                buf = self.view[off : off + nbytes]
            else:  # more than the checkpoint's size: a mapping of its own
                buf = _map(self.fd, size, mmap.MAP_SHARED, off)[1][:nbytes]
        self.regions.append((buf.data_ptr(), off, nbytes))
        self.end = off + nbytes
        return buf, off

    def _flush(self):
        if self.pending is not None:
            buf, off = self.pending
            self.pending = None
            self.writer.put(buf, off)

    def alloc(self, shape, dtype: torch.dtype) -> torch.Tensor:
        nbytes = _size(dtype, shape)
        if self.failed is None and nbytes:
            try:
                return self._map(nbytes)[0].view(dtype).view(shape)
            except (OSError, ValueError) as e:
                self.failed = str(e)
        return torch.empty(shape, dtype=dtype)

    def offset(self, t: torch.Tensor) -> int | None:
        p = t.data_ptr()
        for addr, off, n in self.regions:
            if addr <= p and p + _nbytes(t) <= addr + n:
                return off + p - addr
        return None

    def finish(self, modules: dict) -> str:
        """Index the modules' tensors (those made outside the arena are copied into one region first, and the
        modules switched to those copies), then complete and rename the file. modules: {name: NativeLinear}."""
        if not modules:
            self.abandon()
            return "nothing to cache (no native-kernel linears)"
        if self.failed is None:
            try:
                return self._finish(modules)
            except (OSError, ValueError) as e:
                self.failed = str(e)
        self.abandon()
        return f"not written: {self.failed}"

    def _finish(self, modules: dict) -> str:
        packed = {name: m.packed() for name, m in modules.items()}
        outside = [(name, k) for name, (ts, _) in packed.items() for k, t in ts.items() if self.offset(t) is None]
        if outside:  # scales, zeros, biases, permutations: small, made by torch ops; packed together in one region
            sizes = [-(-_nbytes(packed[name][0][k]) // 64) * 64 for name, k in outside]
            free = shutil.disk_usage(self.tmp.parent).free
            if free < sum(sizes) + (1 << 30):
                raise ValueError(f"{self.tmp.parent} has less than 1 GiB free")
            buf, _ = self._map(sum(sizes))
            at = 0
            for (name, k), n in zip(outside, sizes):
                t = packed[name][0][k]
                copy = buf[at : at + _nbytes(t)].view(t.dtype).view(t.shape).copy_(t)
                packed[name][0][k] = copy
                setattr(modules[name], k, copy)
                modules[name]._ready()  # the kernel's pointers, to the copy
                del t  # the last reference: the first copy is freed now, not after all of them (0.13 GB at once)
                at += n
        spec = {name: {k: (self.offset(t), str(t.dtype).removeprefix("torch."), list(t.shape)) for k, t in ts.items()}
                for name, (ts, _) in packed.items()}
        start = -(-self.end // PAGE) * PAGE if self.direct else self.end
        index = json.dumps({"format": FORMAT, "modules": spec, "meta": {n: meta for n, (_, meta) in packed.items()},
                            "data_end": start, "checkpoint": self.checkpoint}).encode()
        if self.direct:  # O_DIRECT writes whole pages: the JSON ends in spaces up to the footer
            index += b" " * (-(len(index) + 16) % PAGE)
        tail = index + len(index).to_bytes(8, "little") + MAGIC
        if self.direct:
            self._flush()
            buf = _aligned(len(tail))
            buf.copy_(torch.frombuffer(bytearray(tail), dtype=torch.uint8))
            self.writer.put(buf, start)
            self.writer.close()
            self.writer = None
        else:
            os.pwrite(self.fd, tail, start)
        os.ftruncate(self.fd, start + len(tail))
        used = os.fstat(self.fd).st_blocks * 512
        os.close(self.fd)
        self.fd = None
        for old in self.path.parent.glob(self.path.name.rsplit("-", 1)[0] + "-*.lvq"):  # this checkpoint's stale caches
            old.unlink(missing_ok=True)
        os.replace(self.tmp, self.path)
        how = ", written directly: more than the page cache takes dirty" if self.direct else ""
        return f"written to {self.path} ({used / 2**30:.2f} GiB{how})"

    def abandon(self):
        """Remove the unfinished file; buffers already handed out stay valid (the mappings outlive the name)."""
        if self.writer is not None:
            self.writer.close(cancel=True)
            self.writer = None
        self.pending = None
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        with contextlib.suppress(OSError):
            self.tmp.unlink(missing_ok=True)


def _remove_stale(d: Path):
    """Temporary files of loads that died before finishing (their process is gone)."""
    for f in d.glob(".repacked-*.tmp"):
        pid = f.name.rsplit(".", 3)[-3]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                f.unlink()


def _remove_orphans(d: Path):
    """Caches of checkpoint directories that no longer exist (a deleted download, a temporary copy), and those in
    another format (an older lowvram's: this one never reads them)."""
    for f in d.glob("repacked-*.lvq"):
        index = _index(f, any_format=True)
        where = index.get("checkpoint") if index else None
        if index and index["format"] != FORMAT or where and not Path(where).is_dir():
            with contextlib.suppress(OSError):
                f.unlink()


def entries() -> list[dict]:
    """The cache files in cache_dir(): file, checkpoint directory (None if unknown), bytes on disk, last use, format."""
    try:
        files = sorted(cache_dir().glob("repacked-*.lvq"))
    except (RuntimeError, KeyError, OSError):
        return []
    out = []
    for f in files:
        with contextlib.suppress(OSError):
            st = f.stat()
            index = _index(f, any_format=True) or {}
            out.append({"file": f, "checkpoint": index.get("checkpoint"), "bytes": st.st_blocks * 512,
                        "used": st.st_mtime, "format": index.get("format")})
    return out


def cache_arguments(p):
    p.add_argument("checkpoint", nargs="?", help="only the cache of this checkpoint directory")
    p.add_argument("--clear", action="store_true", help="delete the cache files (all, or the checkpoint's)")


def cache_main(args) -> int:
    """`lowvram cache`: where the repacked weights are kept, how much disk they take, and --clear."""
    import time

    want = str(Path(args.checkpoint).resolve()) if args.checkpoint else None
    rows = [e for e in entries() if want is None or e["checkpoint"] == want]
    if want and not rows and not Path(want).is_dir():  # a deleted checkpoint's cache files still match above
        what = "not a directory" if Path(want).exists() else "no such directory"
        raise ValueError(f"{args.checkpoint}: {what}, and no cache file is of a checkpoint there")
    if args.clear:
        freed = 0
        for e in rows:
            with contextlib.suppress(OSError):
                e["file"].unlink()
                freed += e["bytes"]
        print(f"removed {len(rows)} cache file(s), {freed / 2**30:.2f} GiB, from {cache_dir()}")
        return 0
    print(f"{cache_dir()}: {len(rows)} cache file(s), {sum(e['bytes'] for e in rows) / 2**30:.2f} GiB"
          + ("" if enabled() else " (LOWVRAM_CACHE=0: not used)"))
    for e in rows:
        where = e["checkpoint"] or "(unknown)"
        gone = "" if e["checkpoint"] is None or Path(e["checkpoint"]).is_dir() else " (checkpoint gone)"
        gone += "" if e["format"] in (None, FORMAT) else f" (format {e['format']}: an older lowvram's, unused)"
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["used"]))
        print(f"  {e['bytes'] / 2**30:7.2f} GiB  last used {used}  {where}{gone}")
    return 0
