"""Parse a checkpoint's config.json into one flat description of the GLM architecture.

Every generation is the same transformer with a handful of switches (norm, residual, RoPE
variant, qkv layout, MLP); this module is the only place that knows which original config
fields set which switch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A config.json that is missing, malformed, or describes an unsupported model."""


SUPPORTED = (
    "model_type 'chatglm' (ChatGLM-6B, ChatGLM2-6B, ChatGLM3-6B, CodeGeeX2-6B, GLM-4-9B-Chat[-1M], GLM-4V-9B), "
    "'glm' (glm-4-9b-chat-hf), 'glm4' (GLM-4-9B-0414)"
)


@dataclass
class GLMConfig:
    layout: str  # tensor naming: "chatglm-v1" | "chatglm" | "glm" | "glm4"
    generation: str  # best guess from config alone; the tokenizer may refine chatglm2 vs chatglm3
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    norm_eps: float
    max_length: int
    norm: str = "rmsnorm"  # "layernorm" (with bias) | "rmsnorm"
    residual: str = "pre"  # "pre" | "deepnorm" | "sandwich"
    mlp: str = "swiglu"  # "swiglu" | "gelu"
    rope: str = "interleaved"  # "interleaved" (GPT-J pairs on rotary_dim) | "2d" (ChatGLM-6B)
    rotary_dim: int = 64
    rope_base: float = 10000.0
    qkv_bias: bool = True
    linear_bias: bool = False  # bias on dense / MLP linears (ChatGLM-6B only)
    deepnorm_alpha: float = 1.0
    tie_word_embeddings: bool = False
    pre_seq_len: int = 0
    prefix_projection: bool = False
    prefix_hidden_size: int = 0
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    gmask_token_id: int | None = None  # ChatGLM-6B position scheme
    sop_token_id: int | None = None
    mask_token_id: int | None = None
    quantization: dict | None = None  # quantization_config (GPTQ) or {"thudm_bits": n}
    vision: dict | None = None  # vision_config / eva_config, for the multimodal generations
    torch_dtype: str | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _req(cfg: dict, path: str, *names: str):
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    raise ConfigError(f"{path}: missing field {' or '.join(repr(n) for n in names)}")


def _eos_list(v) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in (v if isinstance(v, list) else [v])]


def parse_config(cfg: dict, path: str = "config.json") -> GLMConfig:
    mt = cfg.get("model_type")
    if mt == "chatglm":
        return _parse_chatglm(cfg, path)
    if mt in ("glm", "glm4"):
        return _parse_hf(cfg, path, mt)
    found = f"model_type={mt!r}" if mt else f"no model_type (fields: {', '.join(sorted(cfg)[:12])})"
    raise ConfigError(f"{path}: unsupported model: {found}; supported: {SUPPORTED}")


def _parse_chatglm(cfg: dict, path: str) -> GLMConfig:
    hidden = int(_req(cfg, path, "hidden_size"))
    heads = int(_req(cfg, path, "num_attention_heads"))
    layers = int(_req(cfg, path, "num_layers"))
    quant = {"thudm_bits": int(cfg["quantization_bit"])} if cfg.get("quantization_bit") else None
    if quant and cfg.get("quantization_embeddings"):
        # chatglm-6b-int4-qe: the word embeddings are THUDM-quantized too, and the original replaces the
        # tied lm_head with a quantized linear over the same ints, so the head is untied here.
        quant["embeddings"] = True
    quant = cfg.get("quantization_config") or quant
    common = dict(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        pre_seq_len=int(cfg.get("pre_seq_len") or 0),
        prefix_projection=bool(cfg.get("prefix_projection", False)),
        pad_token_id=cfg.get("pad_token_id"),
        quantization=quant,
        torch_dtype=cfg.get("torch_dtype"),
        raw=cfg,
    )
    if "multi_query_attention" not in cfg and "padded_vocab_size" not in cfg:
        # ChatGLM-6B (v1): GLM-130B blocks.
        head_dim = hidden // heads
        return GLMConfig(
            layout="chatglm-v1",
            generation="visualglm-6b" if cfg.get("eva_config") else "chatglm-6b",
            vocab_size=int(_req(cfg, path, "vocab_size")),
            num_kv_heads=heads,
            head_dim=head_dim,
            ffn_hidden_size=int(cfg.get("inner_hidden_size") or 4 * hidden),
            norm_eps=float(cfg.get("layernorm_epsilon", 1e-5)),
            max_length=int(cfg.get("max_sequence_length", 2048)),
            norm="layernorm",
            residual="deepnorm",
            mlp="gelu",
            rope="2d",
            rotary_dim=head_dim // 2,
            qkv_bias=True,
            linear_bias=True,
            # The original builds its blocks without num_layers, so alpha is always the 28-layer value.
            deepnorm_alpha=math.sqrt(2 * 28),
            tie_word_embeddings=not (quant or {}).get("embeddings"),
            prefix_hidden_size=hidden,
            eos_token_ids=_eos_list(cfg.get("eos_token_id", 130005)),
            gmask_token_id=int(cfg.get("gmask_token_id", 130001)),
            sop_token_id=int(cfg.get("bos_token_id", 130004)),
            mask_token_id=int(cfg.get("mask_token_id", 130000)),
            vision=cfg.get("eva_config") and {k: cfg.get(k) for k in ("eva_config", "qformer_config", "image_length")},
            **common,
        )
    head_dim = int(cfg.get("kv_channels") or hidden // heads)
    vocab = int(_req(cfg, path, "padded_vocab_size", "vocab_size"))
    kv_heads = int(cfg.get("multi_query_group_num") or heads) if cfg.get("multi_query_attention", True) else heads
    if cfg.get("vision_config"):
        generation = "glm-4v-9b"
    elif vocab >= 150000:
        generation = "glm-4-9b-chat"
    else:
        generation = "chatglm2-6b"  # or chatglm3-6b / codegeex2-6b: identical tensors; the tokenizer decides
    if cfg.get("rmsnorm") is False or cfg.get("apply_residual_connection_post_layernorm"):
        raise ConfigError(f"{path}: rmsnorm=false / apply_residual_connection_post_layernorm=true are not used by any GLM release")
    return GLMConfig(
        layout="chatglm",
        generation=generation,
        vocab_size=vocab,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_hidden_size=int(_req(cfg, path, "ffn_hidden_size")),
        norm_eps=float(cfg.get("layernorm_epsilon", 1e-5)),
        max_length=int(cfg.get("seq_length", 32768)),
        rotary_dim=head_dim // 2,
        rope_base=10000.0 * float(cfg.get("rope_ratio") or 1),
        qkv_bias=bool(cfg.get("add_qkv_bias", True)),
        linear_bias=bool(cfg.get("add_bias_linear", False)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        prefix_hidden_size=int(cfg.get("prefix_hidden_size") or hidden),
        eos_token_ids=_eos_list(cfg.get("eos_token_id", 2)),
        vision=cfg.get("vision_config"),
        **common,
    )


def _parse_hf(cfg: dict, path: str, mt: str) -> GLMConfig:
    hidden = int(_req(cfg, path, "hidden_size"))
    heads = int(_req(cfg, path, "num_attention_heads"))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    rope_params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or rope_params.get("rope_type") or "default"
    if kind != "default":  # plain RoPE under a yarn/linear config would be wrong at every position, silently
        raise ConfigError(f"{path}: rope scaling {kind!r} is not supported yet; remove rope_scaling from config.json "
                          "to run the model at its original context")
    theta = cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0
    factor = cfg.get("partial_rotary_factor") or rope_params.get("partial_rotary_factor") or 0.5
    return GLMConfig(
        layout=mt,
        generation="glm-4-9b-chat-hf" if mt == "glm" else "glm-4-0414",
        vocab_size=int(_req(cfg, path, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(_req(cfg, path, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        ffn_hidden_size=int(_req(cfg, path, "intermediate_size")),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        max_length=int(cfg.get("max_position_embeddings", 131072)),
        residual="sandwich" if mt == "glm4" else "pre",
        rotary_dim=int(head_dim * float(factor)),
        rope_base=float(theta),
        qkv_bias=bool(cfg.get("attention_bias", True)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        eos_token_ids=_eos_list(cfg.get("eos_token_id")),
        pad_token_id=cfg.get("pad_token_id"),
        quantization=cfg.get("quantization_config"),
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        raw=cfg,
    )


def load_config(path: str | Path) -> GLMConfig:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: no such directory (expected a Hugging Face checkpoint directory)")
    if p.is_dir():
        p = p / "config.json"
    elif p.suffix != ".json":  # a config.json named directly still works
        raise ConfigError(f"{p}: a file, not a checkpoint directory (expected a directory with config.json)")
    if not p.exists():
        raise ConfigError(f"{p}: no config.json found (expected a Hugging Face checkpoint directory)")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{p}: expected a JSON object")
    parsed = parse_config(cfg, str(p))
    qc = p.parent / "quantize_config.json"
    if qc.exists():  # GPTQ checkpoints written without quantization_config in config.json
        try:
            extra = json.loads(qc.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{qc}: not valid JSON ({e})") from None
        parsed.quantization = {**extra, **(parsed.quantization or {})}
    method = (parsed.quantization or {}).get("quant_method", "gptq")
    if method != "gptq":  # AWQ, compressed-tensors, bitsandbytes: other tensors under the same names
        raise ConfigError(f"{p}: quant_method {method!r} is not supported; lowvram reads GPTQ and THUDM's "
                          "quantization_bit checkpoints")
    if (pack := (parsed.quantization or {}).get("pack_dtype", "int32")) not in ("int32", "torch.int32"):
        raise ConfigError(f"{p}: GPTQ packed in {pack} words is not supported; lowvram reads int32-packed GPTQ")
    return parsed
