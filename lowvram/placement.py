"""Plan where every block goes: the fastest device first, as many blocks as its budget holds, CPU last.

Blocks run where their weights and KV cache live; only the hidden state (a few KB per token) hops
between devices, so an offloaded model computes on the CPU instead of copying weights every token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .config import GLMConfig
from .memory import RUNTIME_OVERHEAD, footprint

# Read bandwidth (GB/s) that decode streams weights at; CPU measured on this project's machine.
BANDWIDTH_GBS = {"cpu": 32.7, "cuda": 256.0, "mps": 100.0}
PCIE_GBS = 25.0  # host-to-GPU copies of streamed blocks (PCIe 4.0 x16, pinned memory)
KNOWN_GPUS = {"rtx 4060 laptop": 256, "rtx 4060": 272, "rtx 3060": 360, "rtx 4090": 1008, "a100": 1555,
              "h100": 3350, "h200": 4800, "t4": 320, "m1": 68, "m2": 100, "m2 pro": 200, "m2 max": 400}

_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_size(s: str) -> int:
    """Bytes of "6GiB", "8GB", "512 MiB". A string needs its unit: a bare "6" meant as GiB would plan for 6
    bytes (numbers that are not strings, as in a max_memory dict, are bytes)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kmg]i?b?|b)?\s*", str(s).lower())
    if not m:
        raise ValueError(f"memory size {s!r} not understood; use e.g. 6GiB, 8GB, 512MiB")
    if not m.group(2) and isinstance(s, str) and float(m.group(1)) != 0:
        raise ValueError(f"memory size {s!r} needs a unit, e.g. {m.group(1)}GiB (or GB, MiB, MB)")
    unit = m.group(2) or ""
    unit = unit if unit.endswith("b") or unit == "" else unit + "b"
    return int(float(m.group(1)) * _UNITS[unit])


def parse_max_memory(s: str) -> dict[str, int]:
    out = {}
    for part in s.split(","):
        dev, _, size = (x.strip() for x in part.partition("="))
        if not size:
            raise ValueError(f"--max-memory {s!r}: expected DEVICE=SIZE[,...], e.g. cuda:0=6GiB,cpu=12GiB")
        if (dev := "cuda:0" if dev == "cuda" else dev) in out:
            raise ValueError(f"--max-memory {s!r}: {dev} given twice; give each device one budget")
        try:
            out[dev] = parse_size(size)
        except ValueError as e:
            raise ValueError(f"--max-memory: {e}") from None
    return check_budgets(out)


def check_budgets(max_memory: dict | str) -> dict[str, int]:
    """max_memory as "cuda:0=6GiB,cpu=12GiB" or a dict of bytes or sizes, each device a known kind."""
    if isinstance(max_memory, str):
        return parse_max_memory(max_memory)
    if not isinstance(max_memory, dict) or not max_memory:
        raise ValueError(f"max_memory must name devices and sizes, e.g. {{'cuda:0': '6GiB', 'cpu': '12GiB'}}, "
                         f"got {max_memory!r}")
    out = {}
    for dev, size in max_memory.items():
        if not re.fullmatch(r"(cpu|cuda)(:[0-9]+)?|mps", str(dev)):
            raise ValueError(f"max_memory: device {dev!r} not understood; use cpu, cuda:N or mps")
        if (dev := "cuda:0" if dev == "cuda" else dev) in out:
            raise ValueError(f"max_memory: {dev} given twice (as cuda and cuda:0)")
        out[dev] = size if isinstance(size, int) and size >= 0 else parse_size(size)
    return out


def detect_budgets() -> dict[str, int]:
    """Free memory per device now: CUDA free bytes, MPS recommended maximum, CPU MemAvailable."""
    import torch

    out = {}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            out[f"cuda:{i}"] = torch.cuda.mem_get_info(i)[0]
    if torch.backends.mps.is_available():
        out["mps"] = torch.mps.recommended_max_memory()
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        out["cpu"] = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError):
        out["cpu"] = _ram() // 2
    if "mps" in out:
        out["cpu"] = unified_cpu_share(out["mps"], out["cpu"])
    return out


def _ram() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def unified_cpu_share(gpu_share: int, cpu_free: int) -> int:
    """On a Mac the GPU's share and the CPU's come out of one RAM: counted apart, a plan could commit more than
    the machine has. Together they get at most 3/4 of it (the system and other apps keep the rest)."""
    return max(0, min(cpu_free, _ram() * 3 // 4 - gpu_share))


def _kind(dev: str) -> str:
    return dev.split(":")[0]


@dataclass
class Plan:
    devices: list[str]
    blocks: dict[str, list[int]]  # target -> block indices; "stream:cuda:0" = weights in CPU memory, run on cuda:0
    bytes: dict[str, int]  # physical device -> planned bytes
    budgets: dict[str, int]
    ctx: int
    output_device: str
    embeddings_device: str = "cpu"
    decode_ms: float = 0.0
    notes: list[str] = field(default_factory=list)

    def placement(self) -> str:
        """The `placement=` string `lowvram.load` and `--placement` accept."""
        return ",".join(f"{d}={b[0]}-{b[-1]}" for d, b in sorted(self.blocks.items(), key=lambda kv: kv[1][:1]) if b)

    def as_dict(self) -> dict:
        return {"placement": self.placement(), "blocks": {d: len(b) for d, b in self.blocks.items()},
                "bytes": self.bytes, "budgets": self.budgets, "ctx": self.ctx, "output_device": self.output_device,
                "embeddings_device": self.embeddings_device, "decode_ms_per_token": round(self.decode_ms, 1),
                "modes": {str(i): ("streamed" if d.startswith("stream:") else "resident")
                          for d, b in self.blocks.items() for i in b},
                "notes": self.notes}


def quantized_as(cfg: GLMConfig) -> tuple[int | None, int]:
    """(bits, group size) of a checkpoint: GPTQ's quantization_config, or THUDM's quantization_bit (one scale per
    row: -1); (None, 128) when it is not quantized."""
    q = cfg.quantization or {}
    if q.get("bits"):
        return int(q["bits"]), int(q.get("group_size", 128) or 128)
    if q.get("thudm_bits"):
        return int(q["thudm_bits"]), -1
    return None, 128


def head_bits_at_load(cfg: GLMConfig, bits: int | None, device: str) -> int | None:
    """What the output layer is in memory on `device` (None: float): a head the checkpoint quantized keeps its
    bits; otherwise a quantized model's float head becomes int8 per row on the CPU (quantized.int8_head) and
    stays float on a GPU or Mac, as does an unquantized model's."""
    q = cfg.quantization or {}
    for key, over in (q.get("dynamic") or {}).items():
        if key.startswith("+:") and ("output_layer" in key or "lm_head" in key):
            return int(over.get("bits", q.get("bits", 8)))
    return 8 if bits is not None and _kind(device) == "cpu" else None


def plan(cfg: GLMConfig, budgets: dict[str, int], ctx: int = 2048, bits: int | None = 4, group: int = 128,
         head_bits: int | None | str = "auto", dtype: str = "bfloat16", kv_dtype: str | None = None,
         bandwidth: dict[str, float] | None = None, vision_bytes: int = 0, mapped_embeddings: bool = False,
         stream: bool = False) -> Plan:
    """Contiguous block ranges per device; a ValueError says how much is missing and what would help.

    mapped_embeddings: the word embeddings will be looked up from the mapped safetensors file (CPU, untied
    head: see loading.embeddings_mappable), so only looked-up rows become resident and the table does not
    count against the CPU budget.
    stream: blocks that do not fit on the first accelerator keep their weights in CPU memory and are copied to
    it for each forward (streaming.py) instead of computing on the CPU: faster prompts, about the same decode.
    The accelerator then holds their KV caches and room to stage two blocks (the running one, the next)."""
    order = sorted(budgets, key=lambda d: (_kind(d) == "cpu", d))  # accelerators first, CPU last
    if head_bits == "auto":
        head_bits = head_bits_at_load(cfg, bits, order[0])
    fp = footprint(cfg, bits, group, head_bits, dtype, kv_dtype)
    free = {d: budgets[d] - RUNTIME_OVERHEAD.get(_kind(d), 0) for d in order}
    used = {d: 0 for d in order}
    if "cpu" not in free and not any(_kind(d) == "cpu" for d in order):
        raise ValueError("no cpu budget given: the embeddings live on the CPU")
    cpu = next(d for d in order if _kind(d) == "cpu")
    mapped = mapped_embeddings and not cfg.tie_word_embeddings
    out_dev = order[0]
    if cfg.tie_word_embeddings:  # the table is the output layer too (ChatGLM-6B): it lives with the head
        used[out_dev] += fp.embeddings
    elif not mapped:
        used[cpu] += fp.embeddings
    used[out_dev] += fp.output + fp.prefill_workspace + vision_bytes
    blocks: dict[str, list[int]] = {d: [] for d in order}
    i = 0
    per_block = fp.block(ctx)
    acc = order[0] if _kind(order[0]) != "cpu" else None
    stream = stream and acc is not None
    if stream:
        used[acc] += 2 * fp.block_weights  # staging: the block running and the one being copied
    for d in order:
        if stream and d == cpu:  # the rest stream through the accelerator: weights here, KV cache there
            blocks[f"stream:{acc}"] = []
            kv = fp.kv_per_token_per_block * ctx
            while (i < cfg.num_layers and used[cpu] + fp.block_weights <= free[cpu]
                   and used[acc] + kv <= free[acc]):
                blocks[f"stream:{acc}"].append(i)
                used[cpu] += fp.block_weights
                used[acc] += kv
                i += 1
        while i < cfg.num_layers and used[d] + per_block <= free[d]:
            blocks[d].append(i)
            used[d] += per_block
            i += 1
    if i < cfg.num_layers or any(used[d] > free[d] for d in order):
        missing = (cfg.num_layers - i) * per_block + sum(max(0, used[d] - free[d]) for d in order)
        hints = []
        if bits is None or bits > 4:
            hints.append("fewer bits (--bits 4)")
        if ctx > 2048:
            kv = fp.kv_per_token_per_block * cfg.num_layers * ctx / 2**30
            hints.append(f"a shorter context (the KV cache of --ctx {ctx} takes {kv:.2f} GiB; try --ctx {ctx // 2})")
        hints.append("more memory for the CPU or another device (--max-memory)")
        how = f"{bits}-bit" if bits else dtype
        raise ValueError(f"the model ({cfg.num_layers} blocks, {how}, context {ctx}) does not fit: "
                         f"{missing / 2**30:.2f} GiB missing across {', '.join(order)}; try {', or '.join(hints)}")
    bw = dict(BANDWIDTH_GBS, **(bandwidth or {}))
    ms = 0.0
    head = fp.embeddings if cfg.tie_word_embeddings else fp.output
    for d in order:
        read = len(blocks[d]) * fp.block_weights + (head if d == out_dev else 0)
        ms += read / (bw.get(d, bw[_kind(d)]) * 1e9) * 1e3
    if stream:
        ms += len(blocks[f"stream:{acc}"]) * fp.block_weights / (PCIE_GBS * 1e9) * 1e3
    total = {d: used[d] + RUNTIME_OVERHEAD.get(_kind(d), 0) for d in order}
    targets = order[:-1] + ([f"stream:{acc}"] if stream else []) + order[-1:] if order[-1] == cpu else order
    p = Plan(targets, blocks, total, budgets, ctx, out_dev, decode_ms=ms,
             embeddings_device=out_dev if cfg.tie_word_embeddings else cpu)
    if mapped:
        p.notes.append(f"embeddings ({fp.embeddings / 2**30:.2f} GiB) looked up from the mapped checkpoint file, "
                       "not counted as resident")
    if stream and blocks[f"stream:{acc}"]:
        n = len(blocks[f"stream:{acc}"])
        p.notes.append(f"{n} of {cfg.num_layers} blocks streamed: weights in CPU memory, copied to {acc} for each "
                       f"forward ({n * fp.block_weights / 2**30:.2f} GiB per token over PCIe)")
    if blocks[cpu] and len(order) > 1:
        p.notes.append(f"{len(blocks[cpu])} of {cfg.num_layers} blocks run on the CPU")
    return p


def placement_arguments(p) -> None:
    """The planner's flags, shared by `lowvram plan`, `chat` and `bench`."""
    p.add_argument("--gpu-mem", default=None, help="budget of cuda:0, e.g. 6GiB (plans the placement)")
    p.add_argument("--max-memory", default=None, help="per device, e.g. cuda:0=6GiB,cuda:1=8GiB,cpu=12GiB")
    p.add_argument("--stream", action="store_true",
                   help="blocks that do not fit the GPU stream through it (weights in CPU memory) instead of "
                        "computing on the CPU: for long prompts")


def budgets_from_arguments(args) -> dict[str, int] | None:
    """--max-memory / --gpu-mem as budgets (the rest detected), or None when neither was given. A budget no
    larger than what its device's runtime takes before any weight is refused: the plan could only fail."""
    if not args.max_memory and not args.gpu_mem:
        return None
    given = parse_max_memory(args.max_memory) if args.max_memory else {}
    if args.gpu_mem:
        if "cuda:0" in given:
            raise ValueError("--gpu-mem sets cuda:0, which --max-memory sets too; give it once")
        try:
            given["cuda:0"] = parse_size(args.gpu_mem)
        except ValueError as e:
            raise ValueError(f"--gpu-mem: {e}") from None
    for dev, n in given.items():
        if n <= (floor := RUNTIME_OVERHEAD.get(_kind(dev), 0)):
            raise ValueError(f"{dev} budget of {n} bytes: not more than the ~{floor >> 20} MiB its runtime takes "
                             "before any weights; give it more, or leave it out")
    return given if args.max_memory else {**detect_budgets(), **given}
