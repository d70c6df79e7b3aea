"""The README's "Will it fit?" table, from the same planner `lowvram plan` uses.

    python benchmarks/fit_table.py > /tmp/fit.md
"""

from lowvram.config import parse_config
from lowvram.known import known_config
from lowvram.placement import plan

GiB = 1 << 30
MODELS = ["chatglm-6b", "chatglm3-6b", "glm-4-9b-chat", "glm-4-9b-chat-1m", "glm-4v-9b"]
TARGETS = [("6 GB GPU", {"cuda:0": 6 * GiB, "cpu": 16 * GiB}), ("8 GB GPU", {"cuda:0": 8 * GiB, "cpu": 16 * GiB}),
           # macOS lets the GPU use about two thirds of unified memory; GPU and CPU together about 3/4 of it
           # (placement.unified_cpu_share)
           ("16 GB Mac", {"mps": int(16 * GiB * 2 / 3), "cpu": 16 * GiB * 3 // 4 - int(16 * GiB * 2 / 3)})]


def vision_bytes(cfg) -> int:
    v = cfg.vision or {}
    if "hidden_size" not in v:
        return 0
    h, f, n = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    tower = n * (4 * h * h + 2 * h * f) + (v["image_size"] // v["patch_size"]) ** 2 * h
    adapter = 4 * h * cfg.hidden_size + 3 * cfg.hidden_size * cfg.ffn_hidden_size  # conv + GLU projection
    return 2 * (tower + adapter)  # fp16, kept unquantized


def cell(cfg, budgets, ctx, bits) -> str:
    try:
        # safetensors output of `lowvram quantize`: untied embeddings are looked up in the file
        p = plan(cfg, budgets, ctx, bits, vision_bytes=vision_bytes(cfg), mapped_embeddings=True)
    except ValueError:
        return "no"
    dev = next(d for d in p.devices if d != "cpu")
    n_cpu = len(p.blocks["cpu"])
    return "yes" if n_cpu == 0 else f"{len(p.blocks[dev])}+{n_cpu} CPU"


def main():
    print("| model | bits | context | " + " | ".join(t for t, _ in TARGETS) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in TARGETS) + " |")
    for name in MODELS:
        cfg = parse_config(known_config(name))
        for bits in (4, 8):
            for ctx in (2048, 8192, 32768):
                if ctx > cfg.max_length:
                    continue
                row = [cell(cfg, b, ctx, bits) for _, b in TARGETS]
                print(f"| {name} | {bits} | {ctx // 1024}K | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
