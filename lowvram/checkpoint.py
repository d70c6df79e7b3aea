"""Read a Hugging Face checkpoint directory tensor by tensor, and map its names to ours.

Files: `model.safetensors`, `pytorch_model.bin`, or shards listed in
`model.safetensors.index.json` / `pytorch_model.bin.index.json`. Safetensors are read tensor by
tensor, each on a private map of its own bytes (`read_safetensors`), `.bin` with
`torch.load(mmap=True, weights_only=True)`, so no second copy of the model is ever held in RAM.
"""

from __future__ import annotations

import json
import mmap
import re
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint whose files are missing, unreadable, or do not match the config."""


INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


class Checkpoint:
    """The tensors of a checkpoint directory: names, shapes, and lazy reads, file by file."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        self.files = self._find_files()
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        for f in self.files:
            for name, shape, dtype in self._scan(f):
                self._where[name] = f
                self._shapes[name] = shape
                self._dtypes[name] = dtype

    def _find_files(self) -> list[Path]:
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: not a directory")
        for idx in INDEX_FILES:
            p = self.dir / idx
            if p.exists():
                try:
                    wm = json.loads(p.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{p}: not a valid index (expected a JSON object with 'weight_map': {e})") from None
                files = sorted({self.dir / f for f in wm.values()})
                missing = [f.name for f in files if not f.exists()]
                if missing:
                    raise CheckpointError(f"{p}: shard file(s) listed but missing: {', '.join(missing)}")
                return files
        for single in SINGLE_FILES:
            if (self.dir / single).exists():
                return [self.dir / single]
        files = sorted(self.dir.glob("*.safetensors")) or sorted(self.dir.glob("pytorch_model*.bin"))
        if not files:
            raise CheckpointError(
                f"{self.dir}: no weights found (expected *.safetensors or pytorch_model*.bin, optionally with an index json)"
            )
        return files

    def _scan(self, f: Path):
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as sf:
                    for k in sf.keys():
                        sl = sf.get_slice(k)
                        yield k, tuple(sl.get_shape()), _st_dtype(sl.get_dtype(), f"{f}: tensor {k}")
            else:
                for k, t in self._load_bin(f).items():
                    yield k, tuple(t.shape), t.dtype
        except CheckpointError:
            raise
        except Exception as e:  # safetensors / zipfile raise many types for a damaged file
            raise CheckpointError(f"{f}: cannot read ({type(e).__name__}: {e}); the file may be truncated or corrupt") from None

    def _load_bin(self, f: Path) -> dict:
        try:
            sd = torch.load(str(f), map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read ({type(e).__name__}: {e}); the file may be truncated or corrupt") from None
        if not isinstance(sd, dict):
            raise CheckpointError(f"{f}: expected a state dict, found {type(sd).__name__}")
        return sd

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def items(self, skip=(), first=()):
        """(name, tensor) for every tensor not in `skip`, one file open at a time; the tensors named in
        `first` come before all others (the loader reads the largest one while little else is resident)."""
        first = [n for n in first if n in self._where and n not in skip]
        if first:
            for f in dict.fromkeys(self._where[n] for n in first):
                yield from self._items_of(f, set(self._where) - set(first))
            skip = set(skip) | set(first)
        for f in self.files:
            yield from self._items_of(f, skip)

    def _items_of(self, f: Path, skip):
        try:
            if f.suffix == ".safetensors":
                yield from read_safetensors(f, skip)
            else:
                sd = self._load_bin(f)
                for k in list(sd):
                    t = sd.pop(k)
                    if k not in skip:
                        yield k, t
                del sd
        except CheckpointError:
            raise
        except Exception as e:
            if isinstance(e, (KeyboardInterrupt, GeneratorExit)):
                raise
            raise CheckpointError(f"{f}: cannot read ({type(e).__name__}: {e})") from None

    def get(self, name: str) -> torch.Tensor:
        f = self._where[name]
        if f.suffix == ".safetensors":
            return next(read_safetensors(f, only={name}))[1]
        return self._load_bin(f)[name]


    def file_rows(self, name: str) -> FileRows | None:
        """`name` (a 2-D tensor) left in its safetensors file, its rows read on demand; None for `.bin`."""
        f = self._where[name]
        if f.suffix != ".safetensors":
            return None
        header, base = _st_header(f)
        info = header[name]
        start, end = info["data_offsets"]
        if end == start or len(info["shape"]) != 2:
            return None
        return FileRows(f, base + start, tuple(info["shape"]), _st_dtype(info["dtype"], f"{f}: tensor {name}"))


class FileRows:
    """A [rows, cols] tensor that stays in its safetensors file: `rows(ids)` reads just those rows.

    Why not a memory mapping: on Linux 6.x a page fault maps a whole page-cache folio (up to 2 MiB), so
    a 512-token prompt looked up in GLM-4-9B's mapped table made 0.42 GB of it resident. A positioned
    read copies only the rows; the rest stays in the page cache, outside the process. The file must not
    be rewritten in place while this is alive (replacing it by a rename, as our writers do, is safe).
    """

    device = torch.device("cpu")

    def __init__(self, path: Path, offset: int, shape: tuple[int, int], dtype: torch.dtype):
        import threading

        self.path, self.offset, self.shape, self.dtype = Path(path), offset, torch.Size(shape), dtype
        self.row_bytes = shape[1] * dtype.itemsize
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed with this object
        self._lock = threading.Lock()  # only where there is no os.preadv (a seek + read pair)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        import os

        uniq, inverse = torch.unique(ids.reshape(-1).cpu(), return_inverse=True)
        if len(uniq) and (int(uniq[0]) < 0 or int(uniq[-1]) >= self.shape[0]):
            raise IndexError(f"token id out of range for the {self.shape[0]}-row embedding table")
        out = torch.empty(len(uniq), self.shape[1], dtype=self.dtype)
        buf = memoryview(out.view(torch.uint8).numpy()).cast("B")
        n, preadv = self.row_bytes, getattr(os, "preadv", None)
        for i, r in enumerate(uniq.tolist()):
            row, at = buf[i * n : (i + 1) * n], self.offset + r * n
            if preadv:
                got = preadv(self._file.fileno(), [row], at)
            else:
                with self._lock:
                    self._file.seek(at)
                    got = self._file.readinto(row)
            if got != n:
                raise OSError(f"{self.path}: short read of embedding row {r} (file changed or truncated?)")
        return out[inverse].view(*ids.shape, self.shape[1])

    def __repr__(self) -> str:
        return f"FileRows({self.path.name}, {tuple(self.shape)}, {self.dtype})"


def _st_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) and where its data starts."""
    import json as _json
    import struct

    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = _json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def read_safetensors(path: Path, skip=(), only=None):
    """(name, tensor) in file order (only the names in `only`, when given), each on a private map of its bytes.

    Why a map per tensor: plain reads into fresh tensors made the kernel fault in and zero fresh memory for
    every byte and then copy the file into it (about a fifth of loading a 6B checkpoint, measured), while a
    map hands over the page cache's pages. One map per tensor, not safe_open's map of the whole file: the map
    goes with the last tensor that views it, so a tensor the caller drops leaves nothing in RSS (with the
    whole file mapped, quantizing a 12 GB checkpoint "used" 12 GB although one tensor was live at a time).
    Private (copy-on-write): writing into a tensor never reaches the file. A tensor whose offset in the file
    does not suit its dtype's alignment is read instead."""
    header, base = _st_header(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if name not in skip and (only is None or name in only):
                yield name, _st_tensor(fh, path, size, base, name, info)


def _st_tensor(fh, path: Path, size: int, base: int, name: str, info: dict) -> torch.Tensor:
    start, end = info["data_offsets"]
    if base + end > size:
        raise CheckpointError(f"{path}: tensor {name} is cut short; the file may be truncated")
    dtype = _st_dtype(info["dtype"], f"{path}: tensor {name}")
    lead = (base + start) % mmap.ALLOCATIONGRANULARITY
    if end > start and lead % dtype.itemsize == 0:
        m = mmap.mmap(fh.fileno(), lead + end - start, offset=base + start - lead, access=mmap.ACCESS_COPY)
        buf = torch.frombuffer(m, dtype=torch.uint8, offset=lead, count=end - start)
        del m  # the tensor keeps the map alive, and unmaps it when it goes
    else:
        buf = torch.empty(end - start, dtype=torch.uint8)
        fh.seek(base + start)
        if fh.readinto(memoryview(buf.numpy())) != end - start:
            raise CheckpointError(f"{path}: tensor {name} is cut short; the file may be truncated")
    return buf.view(dtype).reshape(info["shape"])


_ST_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _st_dtype(s: str, where: str) -> torch.dtype:
    """A safetensors dtype name as torch's; an unknown one (FP8, unsigned 16-bit...) is an error naming `where`,
    not a float32 guess that surfaces later as a size mismatch."""
    if s not in _ST_DTYPES:
        raise CheckpointError(f"{where} has dtype {s}; lowvram reads {', '.join(_ST_DTYPES)}")
    return _ST_DTYPES[s]


# ---- names --------------------------------------------------------------------------------
# Each rule: (regex on the checkpoint name, our name, slot). A slot says where a tensor goes when
# several checkpoint tensors make one of ours (glm's q/k/v projections -> our fused qkv).

_V1 = [
    (r"transformer\.word_embeddings\.(.+)", r"embed.\1"),
    (r"transformer\.layers\.(\d+)\.input_layernorm\.(.+)", r"layers.\1.attn_norm.\2"),
    (r"transformer\.layers\.(\d+)\.attention\.query_key_value\.(.+)", r"layers.\1.attn.qkv.\2"),
    (r"transformer\.layers\.(\d+)\.attention\.dense\.(.+)", r"layers.\1.attn.out.\2"),
    (r"transformer\.layers\.(\d+)\.post_attention_layernorm\.(.+)", r"layers.\1.mlp_norm.\2"),
    (r"transformer\.layers\.(\d+)\.mlp\.dense_h_to_4h\.(.+)", r"layers.\1.mlp.up.\2"),
    (r"transformer\.layers\.(\d+)\.mlp\.dense_4h_to_h\.(.+)", r"layers.\1.mlp.down.\2"),
    (r"transformer\.final_layernorm\.(.+)", r"norm.\1"),
    (r"transformer\.prefix_encoder\.(.+)", r"prefix.\1"),
    (r"lm_head\.(weight|weight_scale)", None),  # tied to the embeddings (quantized-embedding files: the same ints)
    (r".*rotary_emb\.inv_freq", None),
]
_CHATGLM = [
    (r"transformer\.embedding\.word_embeddings\.(.+)", r"embed.\1"),
    (r"transformer\.encoder\.layers\.(\d+)\.input_layernorm\.(.+)", r"layers.\1.attn_norm.\2"),
    (r"transformer\.encoder\.layers\.(\d+)\.self_attention\.query_key_value\.(.+)", r"layers.\1.attn.qkv.\2"),
    (r"transformer\.encoder\.layers\.(\d+)\.self_attention\.dense\.(.+)", r"layers.\1.attn.out.\2"),
    (r"transformer\.encoder\.layers\.(\d+)\.post_attention_layernorm\.(.+)", r"layers.\1.mlp_norm.\2"),
    (r"transformer\.encoder\.layers\.(\d+)\.mlp\.dense_h_to_4h\.(.+)", r"layers.\1.mlp.up.\2"),
    (r"transformer\.encoder\.layers\.(\d+)\.mlp\.dense_4h_to_h\.(.+)", r"layers.\1.mlp.down.\2"),
    (r"transformer\.encoder\.final_layernorm\.(.+)", r"norm.\1"),
    (r"transformer\.output_layer\.(.+)", r"output.\1"),
    (r"transformer\.prefix_encoder\.(.+)", r"prefix.\1"),
    (r"transformer\.vision\.(.+)", r"vision.\1"),
    (r".*rotary_pos_emb\.inv_freq", None),
]
_GLM = [
    (r"model\.embed_tokens\.(.+)", r"embed.\1"),
    (r"model\.layers\.(\d+)\.input_layernorm\.(.+)", r"layers.\1.attn_norm.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.(.+)", r"layers.\1.attn.qkv.\2", 0),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.(.+)", r"layers.\1.attn.qkv.\2", 1),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.(.+)", r"layers.\1.attn.qkv.\2", 2),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.(.+)", r"layers.\1.attn.out.\2"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.(.+)", r"layers.\1.mlp_norm.\2"),
    (r"model\.layers\.(\d+)\.post_self_attn_layernorm\.(.+)", r"layers.\1.post_attn_norm.\2"),
    (r"model\.layers\.(\d+)\.post_mlp_layernorm\.(.+)", r"layers.\1.post_mlp_norm.\2"),
    (r"model\.layers\.(\d+)\.mlp\.gate_up_proj\.(.+)", r"layers.\1.mlp.up.\2"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.(.+)", r"layers.\1.mlp.down.\2"),
    (r"model\.norm\.(.+)", r"norm.\1"),
    (r"lm_head\.(.+)", r"output.\1"),
    (r".*rotary_emb\.inv_freq", None),
]
RULES = {"chatglm-v1": _V1, "chatglm": _CHATGLM, "glm": _GLM, "glm4": _GLM}
FUSED_PARTS = {"glm": 3, "glm4": 3}  # number of slots of a fused tensor, per layout

_compiled: dict[str, list] = {}


def map_name(layout: str, name: str) -> tuple[str | None, int | None] | None:
    """Our name and slot for a checkpoint tensor; (None, None) = known and ignored; None = unknown."""
    if layout not in _compiled:
        _compiled[layout] = [(re.compile(r[0] + "$"), r[1], r[2] if len(r) > 2 else None) for r in RULES[layout]]
    for rx, repl, slot in _compiled[layout]:
        m = rx.match(name)
        if m:
            return (m.expand(repl) if repl else None), slot
    return None


def original_name(layout: str, ours: str, slot: int | None = None) -> str:
    """Inverse of map_name, for writers (quantized checkpoints keep the original names)."""
    for rule in RULES[layout]:
        src, repl, rslot = rule[0], rule[1], (rule[2] if len(rule) > 2 else None)
        if repl is None or rslot != slot:
            continue
        groups = re.findall(r"\((?:\\d\+|\.\+)\)", src)  # the capture groups of the source pattern
        parts = re.split(r"\\(\d)", repl)  # literal, group number, literal, ...
        rx = "".join(re.escape(x) if k % 2 == 0 else groups[int(x) - 1] for k, x in enumerate(parts))
        m = re.fullmatch(rx, ours)
        if m:
            vals = {int(g): v for g, v in zip(parts[1::2], m.groups())}
            it = iter(range(1, len(groups) + 1))
            out = re.sub(r"\((?:\\d\+|\.\+)\)", lambda _: vals[next(it)], src)
            return out.replace("\\.", ".")
    raise KeyError(f"no original name for {ours!r} in layout {layout!r}")
