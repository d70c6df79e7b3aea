"""`lowvram plan MODEL`: where every block goes for a memory budget, and the decode speed to expect."""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import Checkpoint
from .config import load_config, parse_config
from .known import known_config
from .loading import embeddings_will_map
from .placement import budgets_from_arguments, detect_budgets, placement_arguments, plan, quantized_as


def model_config(model: str):
    p = Path(model)
    if p.exists():
        cfg = load_config(p)
        if any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin")) or any(p.glob("*.index.json")):
            Checkpoint(p)  # weights there: a truncated or missing file fails now (headers only), not at load
        from .tokenizer import generation_of

        cfg.generation = generation_of(p, cfg)  # the tokenizer tells what config.json alone cannot, as in `info`
        return cfg
    cfg = parse_config(known_config(model), f"known model {model}")
    cfg.generation = model.lower()
    return cfg


def plan_arguments(p):
    p.add_argument("model", help="checkpoint directory or known model name (chatglm3-6b, glm-4-9b-chat, ...)")
    p.add_argument("--bits", type=int, choices=(4, 8, 16), default=None,
                   help="16 = unquantized bf16/fp16; default: a quantized checkpoint's own bits, else 4 "
                   "(what `lowvram quantize` makes of it)")
    p.add_argument("--group-size", type=int, default=None,
                   help="default: a quantized checkpoint's own, else 128")
    p.add_argument("--ctx", type=int, default=None,
                   help="context length to reserve KV cache for (default 2048, or the model's own if shorter)")
    placement_arguments(p)
    p.add_argument("--kv-int8", action="store_true", help="plan an INT8 KV cache")
    p.add_argument("--json", action="store_true")


def check_arguments(args, cfg) -> None:
    """What `lowvram quantize` would refuse (converters/quantize.py), refused here too: the plan is for a model
    that can be made."""
    if args.ctx is None:
        args.ctx = min(2048, cfg.max_length)
    bits, group = quantized_as(cfg)
    if args.bits is None:
        args.bits = bits or 4  # an unquantized checkpoint: what `lowvram quantize` makes of it
    if args.group_size is None:
        args.group_size = group
    if not 1 <= args.ctx <= cfg.max_length:
        raise ValueError(f"--ctx must be from 1 to the model's context of {cfg.max_length} tokens, got {args.ctx}")
    g = args.group_size
    if g == 0 or g < -1:
        raise ValueError(f"--group-size must be -1 (one group per row) or a positive number of columns, got {g}")
    widths = {"hidden_size": cfg.hidden_size, "ffn_hidden_size": cfg.ffn_hidden_size,
              "attention output (heads x head_dim)": cfg.q_size}
    bad = [f"{k} {v}" for k, v in widths.items() if g > 0 and v % g]
    if bad:
        raise ValueError(f"--group-size {g} does not divide {', '.join(bad)} of {args.model}; "
                         "pick a group size that divides them (e.g. 32) or -1 for one group per row")


def plan_main(args) -> int:
    cfg = model_config(args.model)
    check_arguments(args, cfg)
    budgets = budgets_from_arguments(args) or detect_budgets()
    bits = None if args.bits == 16 else args.bits
    p = plan(cfg, budgets, args.ctx, bits, args.group_size, kv_dtype="int8" if args.kv_int8 else None,
             mapped_embeddings=embeddings_will_map(args.model), stream=args.stream)
    rss = None
    if Path(args.model).is_dir():  # a checkpoint at hand: its own tensors, run entirely on the CPU
        from .memory import predict_rss

        try:
            rss = predict_rss(args.model, prompt_len=min(512, args.ctx), new_tokens=max(0, args.ctx - 512),
                              kv_int8=args.kv_int8, cfg=cfg)
        except Exception:  # a checkpoint the planner can read the config of but not the tensors
            rss = None
    if args.json:
        extra = {"cpu_only_predicted_rss": rss.as_dict()} if rss else {}
        print(json.dumps({"model": args.model, "generation": cfg.generation, "bits": args.bits,
                          "group_size": args.group_size, **p.as_dict(), **extra}, indent=2))
        return 0
    print(f"{cfg.generation}: {cfg.num_layers} blocks at {args.bits}-bit, context {args.ctx}")
    print(f"{'device':10s} {'blocks':>12s} {'planned':>10s} {'budget':>10s}")
    for d in p.devices:
        b = p.blocks[d]
        rng = f"{b[0]}-{b[-1]}" if b else "-"
        if d in p.bytes:
            print(f"{d:10s} {rng:>12s} {p.bytes[d] / 2**30:9.2f}G {p.budgets[d] / 2**30:9.2f}G")
        else:  # a stream: target's memory is counted on its two physical devices
            print(f"{d:10s} {rng:>12s} {'(weights in cpu, run on ' + d.removeprefix('stream:') + ')':>21s}")
    print(f"embeddings on {p.embeddings_device}, output layer on {p.output_device}")
    print(f"expected decode ≈ {p.decode_ms:.0f} ms/token (weights streamed at each device's bandwidth)")
    print(f"placement: {p.placement()}")
    if rss:
        print(f"all on the CPU, this checkpoint: predicted peak RSS {rss.peak / 2**30:.2f} GiB at context {args.ctx} "
              f"(runtime {rss.runtime / 2**30:.2f}, weights {rss.weights / 2**30:.2f}, KV {rss.kv_cache / 2**30:.2f}, "
              f"embeddings read from the file {rss.mapped / 2**30:.2f} not counted)")
    for n in p.notes:
        print(f"note: {n}")
    return 0
