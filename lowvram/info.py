"""`lowvram info PATH`: what a checkpoint is, without loading its weights."""

from __future__ import annotations

import json
from collections import Counter

from .checkpoint import Checkpoint
from .config import load_config
from .tokenizer import generation_of


def _linear_inputs(cfg) -> dict[str, int]:
    """Each quantized linear's input width by its weight's name in the file (qweight rows depend on its bits,
    which may differ per module: an int8 head beside int4 blocks)."""
    import torch

    from .checkpoint import original_name
    from .models.glm import GLM

    with torch.device("meta"):
        net = GLM(cfg)
    out = {}
    for name, p in net.named_parameters():
        if p.dim() == 2:
            for slot in (None, 0, 1, 2):
                try:
                    out[original_name(cfg.layout, name, slot)] = p.shape[1]
                except (KeyError, ValueError, IndexError):
                    pass
    return out


def describe(path) -> dict:
    cfg = load_config(path)
    ckpt = Checkpoint(path)
    names = ckpt.names()
    params, inputs = 0, None
    for n in names:
        shape = ckpt.shape(n)
        count = 1
        for s in shape:
            count *= s
        if n.endswith("qweight"):  # outputs x the module's inputs
            inputs = inputs if inputs is not None else _linear_inputs(cfg)
            count = shape[1] * inputs.get(n.removesuffix("qweight") + "weight", shape[0] * 32 // 4)
        elif n.endswith(("qzeros", "scales", "g_idx", "weight_scale")) or n.endswith("inv_freq"):
            continue
        elif n.endswith("weight") and (cfg.quantization or {}).get("thudm_bits") == 4 and str(ckpt.dtype(n)) == "torch.int8":
            count *= 2
        params += count
    dtypes = Counter(str(ckpt.dtype(n)).removeprefix("torch.") for n in names)
    quant = cfg.quantization
    return {
        "path": str(ckpt.dir),
        "generation": generation_of(path, cfg),
        "layout": cfg.layout,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "vocab_size": cfg.vocab_size,
        "context": cfg.max_length,
        "parameters": params,
        "dtypes": dict(dtypes),
        "quantization": quant,
        "files": [f.name for f in ckpt.files],
        "size_on_disk": ckpt.nbytes(),
        "tensors": len(names),
    }


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def info_arguments(p):
    p.add_argument("path", help="checkpoint directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--tensors", action="store_true", help="list every tensor")


def info_main(args) -> int:
    d = describe(args.path)
    if args.tensors:
        ckpt = Checkpoint(args.path)
        d["tensor_list"] = {n: [list(ckpt.shape(n)), str(ckpt.dtype(n)).removeprefix("torch.")] for n in ckpt.names()}
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"path          {d['path']}")
    print(f"generation    {d['generation']} (layout {d['layout']})")
    print(f"shape         {d['layers']} layers, hidden {d['hidden_size']}, heads {d['heads']} (kv {d['kv_heads']}), "
          f"vocab {d['vocab_size']}, context {d['context']}")
    print(f"parameters    {d['parameters']:,}")
    print(f"dtype         {', '.join(f'{k} x{v}' for k, v in d['dtypes'].items())}")
    print(f"quantization  {json.dumps(d['quantization']) if d['quantization'] else 'none'}")
    print(f"size on disk  {_human(d['size_on_disk'])} in {len(d['files'])} file(s)")
    print(f"tensors       {d['tensors']}")
    for n, (shape, dt) in d.get("tensor_list", {}).items():
        print(f"  {n:70s} {str(tuple(shape)):20s} {dt}")
    return 0
