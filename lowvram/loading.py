"""Build a GLM on the meta device and fill it from a checkpoint, tensor by tensor."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from .checkpoint import FUSED_PARTS, Checkpoint, CheckpointError, map_name
from .config import GLMConfig, load_config
from .models.glm import GLM

QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "weight_scale")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype, device: str) -> torch.dtype:
    """None picks the fast dtype of the device: bf16 on CPU (AMX/AVX512-BF16), fp16 on MPS, bf16/fp16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} not supported; use one of float32, float16, bfloat16")
        return dtype
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} not understood; use one of float32, float16, bfloat16")
        return DTYPES[dtype]
    kind = torch.device(device).type
    if kind == "cuda":
        # bf16 in hardware from Ampere (sm 8.0) on; is_bf16_supported() also says yes for Turing/Pascal, where it is
        # emulated (slow), and asks the current device rather than this one
        return torch.bfloat16 if torch.cuda.get_device_capability(torch.device(device)) >= (8, 0) else torch.float16
    if kind == "mps":
        return torch.float16
    return torch.bfloat16


def layer_devices(placement, device: str, num_layers: int) -> list[torch.device]:
    """One device per block. `placement` is None (all on `device`), a list of devices, or
    a string like "cuda:0=0-19,cpu=20-39". Names like cpu:1 are distinct targets on one CPU."""
    if placement is None:
        return [check_device(device, "device")] * num_layers
    if isinstance(placement, (list, tuple)):
        if len(placement) != num_layers:
            raise ValueError(f"placement lists {len(placement)} devices for {num_layers} layers")
        return [check_device(_phys(d), "placement") for d in placement]
    out: list[torch.device | None] = [None] * num_layers
    for target, first, last in _ranges(placement):
        if first > last:
            raise ValueError(f"placement {placement!r}: range {first}-{last} is reversed (FIRST-LAST, FIRST <= LAST)")
        if last >= num_layers:
            raise ValueError(f"placement {placement!r}: range {first}-{last} outside 0-{num_layers - 1}")
        if twice := [i for i in range(first, last + 1) if out[i] is not None]:
            raise ValueError(f"placement {placement!r}: layers {twice} are given to two targets")
        dev = check_device(_phys(target), "placement")
        for i in range(first, last + 1):
            out[i] = dev
    gaps = [i for i, d in enumerate(out) if d is None]
    if gaps:
        raise ValueError(f"placement {placement!r}: no device for layers {gaps}")
    return out  # type: ignore[return-value]


def check_device(name, field: str = "device") -> torch.device:
    """A device the user named, or one line saying what was expected and, for a GPU, what is missing."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{field} {name!r} not understood; use cpu, cuda, cuda:N or mps") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{field} {name!r}: lowvram runs on cpu, cuda[:N] or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{field} {name!r}: torch sees no CUDA device (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda or 'none'})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{field} {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{field} {name!r}: torch sees no Apple MPS device")
    return dev


def _phys(target: str) -> str:
    """cpu:N names a separate placement target but the same physical device; stream:DEV computes on DEV."""
    target = str(target).removeprefix("stream:")
    return "cpu" if target.startswith("cpu") else target


def _ranges(placement: str) -> list[tuple[str, int, int]]:
    """"cuda:0=0-19,cpu=20-39" -> [("cuda:0", 0, 19), ("cpu", 20, 39)]."""
    out = []
    for part in str(placement).split(","):
        target, _, rng = part.strip().partition("=")
        a, _, b = rng.partition("-")
        if not target.strip() or not rng or not a.isdigit() or not (b or a).isdigit():
            raise ValueError(f"placement {placement!r}: expected TARGET=FIRST-LAST[,...], got {part!r}")
        out.append((target.strip(), int(a), int(b or a)))
    return out


def streamed_layers(placement) -> set[int]:
    """Blocks of a placement string under a `stream:` target (weights in CPU memory, computed on the GPU)."""
    if not isinstance(placement, str):
        return set()
    return {i for target, a, b in _ranges(placement) if target.startswith("stream:") for i in range(a, b + 1)}


def build(path: str | Path, device="cpu", dtype=None, backend: str | None = None, placement=None,
          cfg: GLMConfig | None = None, repack_cache: bool | None = None) -> tuple[GLM, GLMConfig, dict]:
    """The network with every weight loaded; returns (net, config, load report)."""
    cfg = cfg or load_config(path)
    ckpt = Checkpoint(path)
    devs = layer_devices(placement, device, cfg.num_layers)
    dtype = resolve_dtype(dtype, devs[0])
    if backend is not None:
        from .kernels import check_backend

        backend = check_backend(backend)
        if dtype == torch.float32 and backend != "torch":
            raise ValueError(f"backend {backend!r} with dtype float32: float32 is the exact reference path (weights "
                             "dequantized, torch matmuls); leave backend unset or use bfloat16/float16")
    with torch.device("meta"):
        net = GLM(cfg)
    streamed = streamed_layers(placement)
    cache = arena = cache_note = None
    if cfg.quantization and not streamed and all(d.type == "cpu" for d in devs):
        from . import repack_cache as rc
        from .kernels import default_backend

        kernel = (backend or default_backend(devs[0], dtype)) if rc.wanted(repack_cache) else None
        if kernel not in (None, "native"):  # float32's reference path, ONNX Runtime, torch's ops: no files read
            cache_note = f"nothing to cache (the {kernel!r} backend repacks nothing)"
        elif kernel and (cache_file := rc.cache_path(ckpt.dir, ckpt.files, _cache_options(cfg, dtype, backend))):
            cache = rc.open_cache(cache_file)
            if cache is None:  # this load repacks into a new cache file
                arena = rc.Arena(cache_file, sum(f.stat().st_size for f in ckpt.files), ckpt.dir)
    _mmap_threshold(1 << 20)
    try:
        with _repack_into(arena):
            report = fill(net, ckpt, cfg, dtype, devs, backend, streamed, cache)
    except BaseException:
        if arena is not None:
            arena.abandon()
        raise
    finally:
        _mmap_threshold(32 << 20)
    if cache_note is not None:
        report["repack_cache"] = cache_note
    if cache is not None:
        report["repack_cache"] = f"mapped from {cache_file}"
    elif arena is not None:
        from .kernels.native import NativeLinear

        report["repack_cache"] = arena.finish({n: m for n, m in net.named_modules() if isinstance(m, NativeLinear)})
        trim_heap()  # the scales and zeros just copied into the file: their first copies go back to the OS
    if streamed:
        from .streaming import stream_blocks

        stream_blocks(net, {i: devs[i] for i in streamed})
        report["streamed_layers"] = sorted(streamed)
    net.eval()
    return net, cfg, report


def _cache_options(cfg: GLMConfig, dtype: torch.dtype, backend: str | None) -> dict:
    """What decides which modules are built, and how, besides the files and the kernel build."""
    import os

    env = {k: os.environ.get(k) for k in ("LOWVRAM_BACKEND", "LOWVRAM_QUANTIZE_HEAD", "LOWVRAM_MMAP_EMBEDDINGS")}
    return {"config": repr(cfg), "dtype": str(dtype), "backend": backend, **env}


def _repack_into(arena):
    """Native linears built inside repack into the cache file being written (repack_cache.Arena)."""
    import contextlib

    if arena is None:
        return contextlib.nullcontext()
    from .kernels.native import weights_in

    return weights_in(arena.alloc)


def _layer_of(name: str) -> int | None:
    return int(name.split(".")[1]) if name.startswith("layers.") else None


def _target_device(name: str, devs: list[torch.device], first: torch.device, tied: bool) -> torch.device:
    """Where a tensor lives under a placement, as the planner assumes: each block on its device; the final
    norm and output layer on the first block's device (the fastest: accelerators come first in a plan);
    the word embeddings on the CPU (only looked up: one row per token travels), except a tied table
    (ChatGLM-6B), which is also the output layer."""
    if (i := _layer_of(name)) is not None:
        return devs[i]
    if name.startswith("embed.") and not tied:
        return torch.device("cpu")
    return first


def _mmap_threshold(nbytes: int):
    """glibc's threshold above which an allocation gets its own mapping, returned to the OS when freed.

    While loading, every tensor above 1 MiB is read, converted and dropped: with glibc's default the
    threshold climbs to the largest size freed so far and later tensors land in the heap, whose holes
    stayed resident (~70 MB of the 6B model's load-time peak). Afterwards 32 MiB (glibc's own ceiling)
    keeps prompt-sized activations in the heap, where they are reused instead of faulted in each time."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, int(nbytes))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def trim_heap():
    """Hand freed buffers back to the OS (glibc keeps them otherwise, and RSS stays high)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def keep_heap():
    """Serve a prompt's activations (up to 32 MiB each) from glibc's heap and keep up to 256 MiB of it free between
    uses. By default glibc maps each such tensor afresh and unmaps it when freed, so every GEMM output was written
    into new pages: those page faults (host faults too, in a VM) were 10-20% of a 512-token prefill (Zen 5 VM,
    separate processes: 90-96 -> 101-107 tok/s; peak RSS +0-35 MiB). Called after loading, so the load's own
    transients still go back to the OS (trim_heap). Process-wide (glibc's settings); LOWVRAM_KEEP_HEAP=0 skips it."""
    import os
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("LOWVRAM_KEEP_HEAP", "1") == "0":
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: glibc's maximum (larger requests are still mapped)
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _orig(layout: str, name: str) -> str:
    """The checkpoint's own name for one of ours, for messages users can grep their files for."""
    from .checkpoint import original_name

    try:
        return original_name(layout, name, 0 if FUSED_PARTS.get(layout) and ".attn.qkv." in name else None)
    except KeyError:
        return name


def mmap_embeddings_enabled() -> bool:
    """LOWVRAM_MMAP_EMBEDDINGS=0 loads the word-embedding table instead of reading its rows from the file
    (for comparisons; the name is from when the file was memory-mapped)."""
    import os

    return os.environ.get("LOWVRAM_MMAP_EMBEDDINGS", "1").lower() not in ("0", "false", "no", "off")


def embeddings_will_map(model: str | Path) -> bool:
    """Whether a CPU run looks the embeddings up from the file: safetensors checkpoints (what `lowvram
    quantize` writes, so also a known name's quantized output) unless LOWVRAM_MMAP_EMBEDDINGS=0."""
    p = Path(model)
    return mmap_embeddings_enabled() and (not p.is_dir() or any(p.glob("*.safetensors")))


def embeddings_mappable(ckpt: Checkpoint, cfg: GLMConfig, first: torch.device) -> str | None:
    """The checkpoint name of the word embeddings when they will be looked up in the file.

    Only on the CPU, from safetensors, and only when the output layer is not tied to the table
    (ChatGLM-6B's tied head reads every row each token: reading rows would gain nothing and convert the whole
    table per token)."""
    if torch.device(first).type != "cpu" or cfg.tie_word_embeddings or not mmap_embeddings_enabled():
        return None
    from .checkpoint import original_name

    try:
        cname = original_name(cfg.layout, "embed.weight")
    except KeyError:
        return None
    want = (cfg.vocab_size, cfg.hidden_size)
    if cname not in ckpt.names() or ckpt.shape(cname) != want or not ckpt.dtype(cname).is_floating_point:
        return None
    if ckpt._where[cname].suffix != ".safetensors":
        return None
    return cname


def _map_embeddings(net: GLM, ckpt: Checkpoint, cfg: GLMConfig, dtype: torch.dtype, first: torch.device) -> str | None:
    """Look the word embeddings up in the file instead of loading them; the checkpoint name, or None."""
    cname = embeddings_mappable(ckpt, cfg, first)
    if cname is None or tuple(net.embed.weight.shape) != ckpt.shape(cname):
        return None
    from .models.glm import FileEmbedding

    try:
        table = ckpt.file_rows(cname)
    except (OSError, ValueError):
        return None
    if table is None:
        return None
    net.embed = FileEmbedding(table, dtype)
    return cname


def _mismatch(ckpt: Checkpoint, cfg: GLMConfig, missing: list, unexpected: list, misshaped: list) -> None:
    if missing or unexpected or misshaped:
        msg = [f"{ckpt.dir}: checkpoint does not match its config ({cfg.generation}, layout {cfg.layout})"]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                more = f" ... and {len(items) - 8} more" if len(items) > 8 else ""
                msg.append(f"{label} {len(items)}: {', '.join(items[:8])}{more}")
        raise CheckpointError("; ".join(msg))


def check_float_tensors(ckpt: Checkpoint, cfg: GLMConfig) -> None:
    """A full-precision checkpoint's tensor names and shapes against its config, from the file headers alone:
    `lowvram quantize` checks this before any work (a load finds the same while filling, in the same words)."""
    with torch.device("meta"):
        expected = {n: tuple(p.shape) for n, p in GLM(cfg).named_parameters()}
    done: set[str] = set()
    unexpected, misshaped = [], []
    fused: dict[str, dict[int, tuple]] = defaultdict(dict)
    for cname in ckpt.names():
        mapped = map_name(cfg.layout, cname)
        name, slot = mapped if mapped is not None else (None, None)
        if mapped is not None and (name is None or (name.startswith("vision.") and cfg.vision)):
            continue  # not part of the language model (rotary tables, the vision tower)
        if name not in expected:
            unexpected.append(cname)
        elif slot is not None:
            fused[name][slot] = ckpt.shape(cname)
        elif ckpt.shape(cname) != expected[name]:
            misshaped.append(f"{cname} (checkpoint {ckpt.shape(cname)}, expected {expected[name]})")
            done.add(name)
        else:
            done.add(name)
    nparts = FUSED_PARTS.get(cfg.layout, 1)
    for name, parts in fused.items():
        rows = sum(s[0] for s in parts.values())
        if len(parts) != nparts:
            misshaped.append(f"{name} (only parts {sorted(parts)} of {nparts} present)")
        elif (rows, *parts[0][1:]) != expected[name]:
            misshaped.append(f"{_orig(cfg.layout, name)} (checkpoint parts of {rows} rows in all, expected "
                             f"{expected[name]})")
        done.add(name)
    _mismatch(ckpt, cfg, [_orig(cfg.layout, n) for n in expected if n not in done], unexpected, misshaped)


def fill(net: GLM, ckpt: Checkpoint, cfg: GLMConfig, dtype: torch.dtype, devs: list[torch.device],
         backend: str | None, streamed: set[int] = frozenset(), cache: dict | None = None) -> dict:
    """cache: native modules' tensors already repacked ({module name: tensors}, repack_cache), used instead of
    the file's tensors for those modules."""
    from .kernels import make_linear
    from .quantized import int8_head, int8_rows

    def cached(mod_name: str):
        if cache is None or mod_name not in cache:
            return None
        from .kernels.native import NativeLinear

        ts = dict(cache[mod_name])
        return NativeLinear.from_packed(ts, ts.pop("meta"), dtype)

    expected = dict(net.named_parameters())
    first = devs[0]
    done: set[str] = set()
    embed_mapped = _map_embeddings(net, ckpt, cfg, dtype, torch.device("cpu"))
    if embed_mapped:
        done.add("embed.weight")
    unexpected, misshaped, ignored = [], [], []
    fused: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    quant: dict[str, dict] = defaultdict(lambda: defaultdict(dict))  # module -> slot -> suffix -> tensor
    nparts = FUSED_PARTS.get(cfg.layout, 1)

    def assign(name: str, t: torch.Tensor):
        want = tuple(expected[name].shape)
        if tuple(t.shape) != want:
            misshaped.append(f"{_orig(cfg.layout, name)} (checkpoint {tuple(t.shape)}, expected {want})")
            done.add(name)  # reported as misshaped, not also as missing
            return
        mod_name, _, pname = name.rpartition(".")
        mod = net.get_submodule(mod_name)
        dev = _target_device(name, devs, first, cfg.tie_word_embeddings)
        if _layer_of(name) in streamed:  # kept in CPU memory, copied to `dev` per forward (streaming.py)
            dev = torch.device("cpu")
        mod._parameters[pname] = nn.Parameter(t.to(device=dev, dtype=dtype), requires_grad=False)
        done.add(name)

    def quant_ready(mod_name: str) -> bool:
        """All of a quantized linear's tensors are in (they usually sit together in one shard)."""
        parts, lin = quant[mod_name], net.get_submodule(mod_name)
        n = nparts if cfg.layout in FUSED_PARTS and mod_name.endswith("attn.qkv") else 1
        early_bias = fused.get(mod_name + ".bias", {})
        for slot, t in early_bias.items():  # a fused bias read before its quantized weight
            parts[slot]["bias"] = t
        if len(parts) < n:
            return False
        for p in parts.values():
            need = {"qweight", "qzeros", "scales", "g_idx"} if "qweight" in p else {"weight", "weight_scale"}
            if getattr(lin, "bias", None) is not None and lin.bias.is_meta:
                need.add("bias")
            if not need <= p.keys():
                return False
        fused.pop(mod_name + ".bias", None)
        return True

    def build_quantized(mod_name: str):
        from .quantized import build_linear

        if mod_name == "embed":
            return build_quantized_embeddings(quant.pop(mod_name))
        parts = quant.pop(mod_name)  # the backend keeps its own copy: drop the file's at once
        lin = net.get_submodule(mod_name)
        dev = _target_device(mod_name + ".weight", devs, first, cfg.tie_word_embeddings)
        try:
            new = cached(mod_name)
            if new is None:
                new = build_linear(cfg, mod_name, parts, lin, dev, dtype, backend)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{ckpt.dir}: quantized tensor {mod_name}: {e}") from None
        if _layer_of(mod_name) in streamed:  # built for its GPU (the backend's layout), then kept on the CPU
            from .streaming import offload

            offload(new, pin=dev.type == "cuda")
        parent, _, attr = mod_name.rpartition(".")
        setattr(net.get_submodule(parent), attr, new)
        done.update(n for n in expected if n.rpartition(".")[0] == mod_name)
        quantized.append(mod_name)

    def build_quantized_embeddings(parts: dict):
        """THUDM's quantized-embedding files: the table is looked up on the CPU; the output layer is a
        quantized linear over the same ints (as the original's lm_head), built for the head's device."""
        from .quantized import QuantizedEmbedding, build_linear

        t = parts.get(0, {})
        bits = int((cfg.quantization or {}).get("thudm_bits") or 0)
        table = _orig(cfg.layout, "embed.weight").removesuffix(".weight")
        if "weight_scale" not in t or "weight" not in t or bits not in (4, 8):
            raise CheckpointError(f"{ckpt.dir}: quantized tensor {table}: needs weight and weight_scale "
                                  f"with quantization_bit 4 or 8 (THUDM quantized embeddings)")
        want = (cfg.vocab_size, cfg.hidden_size * bits // 8)
        if tuple(t["weight"].shape) != want or tuple(t["weight_scale"].shape) != want[:1]:
            misshaped.append(f"{table} (weight {tuple(t['weight'].shape)}, weight_scale "
                             f"{tuple(t['weight_scale'].shape)}; expected {want} and {want[:1]} at {bits} bits)")
            done.update(("embed.weight", "output.weight"))
            return
        net.embed = QuantizedEmbedding(t["weight"].clone(), t["weight_scale"].clone(), bits, dtype)
        done.add("embed.weight")
        if net.output is not None:
            try:
                head = cached("output")
                net.output = head if head is not None else build_linear(cfg, "output", {0: dict(t)}, net.output, first,
                                                                        dtype, backend)
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{ckpt.dir}: quantized tensor {table} as the output layer: {e}") from None
            done.add("output.weight")
            quantized.append("output")
        quantized.append("embed")

    quantized: list[str] = []
    # The output layer is the largest matrix (a vocabulary of rows); built first, its file copy and the
    # backend's copy coexist while little else is resident, so they do not add to the final peak.
    head_first = [c for c in ckpt.names() if ((map_name(cfg.layout, c) or (None,))[0] or "").startswith("output.")]
    for cname, t in ckpt.items(skip={embed_mapped} if embed_mapped else (), first=head_first):
        mapped = map_name(cfg.layout, cname)
        if mapped is None:
            unexpected.append(cname)
            continue
        name, slot = mapped
        if name is None or (name.startswith("vision.") and cfg.vision):
            ignored.append(cname)
            continue
        mod_name, _, suffix = name.rpartition(".")
        if suffix in QUANT_SUFFIXES or (suffix == "weight" and not torch.is_floating_point(t)) or (
                mod_name in quant and suffix == "bias"):
            quant[mod_name][slot or 0][suffix] = t
            if quant_ready(mod_name):
                build_quantized(mod_name)
            continue
        if name not in expected:
            unexpected.append(cname)
            continue
        if (name == "output.weight" and int8_head(cfg, first, dtype, backend, t.shape[-1])
                and t.shape == expected[name].shape):
            head = cached("output")
            net.output = head if head is not None else make_linear(int8_rows(t), "native", dtype)
            done.add(name)
            quantized.append("output")
            continue
        if slot is not None:
            fused[name][slot] = t
            if mod_name in quant:
                if quant_ready(mod_name):
                    build_quantized(mod_name)
            elif len(fused[name]) == nparts:
                parts = fused.pop(name)
                assign(name, torch.cat([parts[i] for i in range(nparts)], dim=0))
            continue
        assign(name, t)

    for name, parts in list(fused.items()):
        mod_name = name.rpartition(".")[0]
        if mod_name in quant:  # a bias whose weight turned out quantized, or a part left unquantized beside them
            for slot, t in parts.items():
                quant[mod_name][slot]["bias" if name.endswith(".bias") else "float"] = t
        else:
            misshaped.append(f"{name} (only parts {sorted(parts)} of {nparts} present)")
    for mod_name in sorted(quant):  # incomplete sets: build_linear names what is missing
        build_quantized(mod_name)
    quantized.sort()

    _mismatch(ckpt, cfg, [_orig(cfg.layout, n) for n in expected if n not in done], unexpected, misshaped)
    trim_heap()
    keep_heap()
    return {"ignored": ignored, "quantized": quantized, "dtype": dtype, "devices": devs,
            "mapped": ["embed.weight"] if embed_mapped else []}
