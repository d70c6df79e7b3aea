"""Random checkpoints in the exact original layouts, for tests and benchmarks (no hub here).

`write_checkpoint` writes any state dict of original tensor names the way the original
`save_pretrained` does (single file or shards + index, safetensors or pytorch .bin);
`random_state` draws one for a config dict; `TINY` holds small configs per generation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lowvram.checkpoint import FUSED_PARTS, original_name
from lowvram.config import parse_config
from lowvram.known import KNOWN
from lowvram.models.glm import GLM

from . import atomic_directory

# The released configs with small dimensions: every flag stays as in the real model.
_CHATGLM2 = dict(KNOWN["chatglm2-6b"]["config"], hidden_size=64, num_attention_heads=4, kv_channels=16,
                 ffn_hidden_size=96, num_layers=2, padded_vocab_size=160, seq_length=256, torch_dtype="float32")

TINY: dict[str, dict] = {
    "chatglm-6b": {
        "model_type": "chatglm", "architectures": ["ChatGLMModel"], "hidden_size": 64, "num_attention_heads": 4,
        "num_layers": 2, "inner_hidden_size": 256, "vocab_size": 160, "max_sequence_length": 256,
        "layernorm_epsilon": 1e-5, "bos_token_id": 152, "eos_token_id": 153, "mask_token_id": 150,
        "gmask_token_id": 151, "pad_token_id": 3, "position_encoding_2d": True, "torch_dtype": "float32",
    },
    "chatglm2-6b": dict(_CHATGLM2),
    "chatglm3-6b": dict(_CHATGLM2, rope_ratio=50),
    "glm-4-9b-chat": dict(_CHATGLM2, layernorm_epsilon=1.5625e-7, rope_ratio=500, eos_token_id=[157, 158, 159],
                          pad_token_id=157),
    "glm-4-9b-chat-hf": {
        "model_type": "glm", "architectures": ["GlmForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96, "num_hidden_layers": 2,
        "vocab_size": 160, "max_position_embeddings": 256, "rms_norm_eps": 1.5625e-7, "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5, "attention_bias": True, "tie_word_embeddings": False,
        "eos_token_id": [157, 158, 159], "pad_token_id": 157, "hidden_act": "silu", "torch_dtype": "float32",
    },
}
TINY["glm-4-0414"] = dict(TINY["glm-4-9b-chat-hf"], model_type="glm4", architectures=["Glm4ForCausalLM"])


def state_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Original tensor name -> shape, for a config dict."""
    cfg = parse_config(config)
    with torch.device("meta"):
        net = GLM(cfg)
    nparts = FUSED_PARTS.get(cfg.layout, 1)
    out = {}
    for name, p in net.named_parameters():
        if cfg.layout in FUSED_PARTS and ".attn.qkv." in name:
            sizes = [cfg.q_size, cfg.kv_size, cfg.kv_size]
            for slot in range(nparts):
                out[original_name(cfg.layout, name, slot)] = (sizes[slot], *p.shape[1:])
        else:
            out[original_name(cfg.layout, name)] = tuple(p.shape)
    if cfg.layout == "chatglm-v1":
        out["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)  # stored although tied
    return out


def random_state(config: dict, seed: int = 0, std: float = 0.5) -> dict[str, torch.Tensor]:
    """Weights like a briefly trained model's: norms near 1, matrices scaled by 1/sqrt(fan-in)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in state_shapes(config).items():
        if "layernorm" in name or name.endswith(("norm.weight",)):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g) if name.endswith("weight") else 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 2 and "embed" not in name and "prefix_encoder.embedding" not in name:
            t = torch.randn(shape, generator=g) * (std / shape[1] ** 0.5) * 2
        else:
            t = torch.randn(shape, generator=g) * std
        sd[name] = t
    if "lm_head.weight" in sd and "transformer.word_embeddings.weight" in sd:
        sd["lm_head.weight"] = sd["transformer.word_embeddings.weight"]
    return sd


def write_checkpoint(out: str | Path, config: dict, state: dict[str, torch.Tensor], fmt: str = "safetensors",
                     shards: int = 1, dtype: torch.dtype | None = None) -> Path:
    """Write config.json + weights like `save_pretrained`: one file, or `shards` files with an index."""
    out = Path(out)
    with atomic_directory(out) as tmp:
        cfg = dict(config)
        if dtype is not None:
            cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        names = list(state)
        per = -(-len(names) // shards)
        ext = "safetensors" if fmt == "safetensors" else "bin"
        base = "model" if fmt == "safetensors" else "pytorch_model"
        weight_map = {}
        for i in range(shards):
            chunk = {n: _store(state[n], dtype) for n in names[i * per : (i + 1) * per]}
            fname = f"{base}.{ext}" if shards == 1 else f"{base}-{i + 1:05d}-of-{shards:05d}.{ext}"
            _save(chunk, tmp / fname, fmt)
            weight_map.update({n: fname for n in chunk})
        if shards > 1:
            total = sum(t.numel() * t.element_size() for t in state.values())
            idx = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / f"{base}.{ext}.index.json").write_text(json.dumps(idx, indent=2))
    return out


def _store(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and torch.is_floating_point(t):
        t = t.to(dtype)
    return t.contiguous()


def _save(sd: dict, path: Path, fmt: str):
    if fmt == "safetensors":
        from safetensors.torch import save_file

        # Tied tensors share storage; safetensors refuses shared storage.
        save_file({k: v.clone() for k, v in sd.items()}, str(path), metadata={"format": "pt"})
    elif fmt == "bin":
        torch.save(sd, str(path))
    else:
        raise ValueError(f"unknown format {fmt!r}: use 'safetensors' or 'bin'")


def write_random(out: str | Path, generation: str = "chatglm3-6b", seed: int = 0, fmt: str = "safetensors",
                 shards: int = 1, dtype: torch.dtype | None = None, **overrides) -> Path:
    """A tiny random checkpoint of `generation` (a key of TINY) with config `overrides`."""
    config = dict(TINY[generation], **overrides)
    return write_checkpoint(out, config, random_state(config, seed), fmt=fmt, shards=shards, dtype=dtype)
