"""The released GLM models by name: hub repo and the config.json fields that fix their shapes.

Used to resolve `lowvram quantize chatglm3-6b`, to plan memory for a model not downloaded yet,
and to write random full-size checkpoints for benchmarks.
"""

from __future__ import annotations

_CHATGLM2 = {
    "model_type": "chatglm", "architectures": ["ChatGLMModel"], "add_bias_linear": False, "add_qkv_bias": True,
    "apply_residual_connection_post_layernorm": False, "multi_query_attention": True, "original_rope": True,
    "post_layer_norm": True, "rmsnorm": True, "tie_word_embeddings": False, "layernorm_epsilon": 1e-5,
    "hidden_size": 4096, "num_attention_heads": 32, "kv_channels": 128, "multi_query_group_num": 2,
    "ffn_hidden_size": 13696, "num_layers": 28, "padded_vocab_size": 65024, "seq_length": 32768,
    "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float16",
}
_GLM4 = dict(_CHATGLM2, num_layers=40, padded_vocab_size=151552, layernorm_epsilon=1.5625e-07, rope_ratio=500,
             seq_length=131072, eos_token_id=[151329, 151336, 151338], pad_token_id=151329, torch_dtype="bfloat16")
_GLM_HF = {
    "model_type": "glm", "architectures": ["GlmForCausalLM"], "hidden_size": 4096, "num_attention_heads": 32,
    "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 13696, "num_hidden_layers": 40,
    "vocab_size": 151552, "max_position_embeddings": 131072, "rms_norm_eps": 1.5625e-07, "rope_theta": 5000000.0,
    "partial_rotary_factor": 0.5, "attention_bias": True, "tie_word_embeddings": False, "hidden_act": "silu",
    "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329, "torch_dtype": "bfloat16",
}

KNOWN: dict[str, dict] = {
    "chatglm-6b": {
        "repo": "THUDM/chatglm-6b",
        "config": {
            "model_type": "chatglm", "architectures": ["ChatGLMModel"], "hidden_size": 4096,
            "num_attention_heads": 32, "num_layers": 28, "inner_hidden_size": 16384, "vocab_size": 130528,
            "max_sequence_length": 2048, "layernorm_epsilon": 1e-5, "bos_token_id": 130004,
            "eos_token_id": 130005, "mask_token_id": 130000, "gmask_token_id": 130001, "pad_token_id": 3,
            "position_encoding_2d": True, "torch_dtype": "float16",
        },
    },
    "chatglm2-6b": {"repo": "THUDM/chatglm2-6b", "config": dict(_CHATGLM2)},
    "chatglm3-6b": {"repo": "THUDM/chatglm3-6b", "config": dict(_CHATGLM2, seq_length=8192)},
    "chatglm3-6b-32k": {"repo": "THUDM/chatglm3-6b-32k", "config": dict(_CHATGLM2, rope_ratio=50)},
    "codegeex2-6b": {"repo": "THUDM/codegeex2-6b", "config": dict(_CHATGLM2, seq_length=8192)},
    "glm-4-9b-chat": {"repo": "THUDM/glm-4-9b-chat", "config": dict(_GLM4)},
    "glm-4-9b-chat-1m": {
        "repo": "THUDM/glm-4-9b-chat-1m",
        "config": dict(_GLM4, multi_query_group_num=4, rope_ratio=10000, seq_length=1048576),
    },
    "glm-4-9b-chat-hf": {"repo": "THUDM/glm-4-9b-chat-hf", "config": dict(_GLM_HF)},
    "glm-4-9b-0414": {
        "repo": "THUDM/GLM-4-9B-0414",
        "config": dict(_GLM_HF, model_type="glm4", architectures=["Glm4ForCausalLM"], max_position_embeddings=32768,
                       rms_norm_eps=1e-5, rope_theta=10000.0),
    },
    "glm-4v-9b": {
        "repo": "THUDM/glm-4v-9b",
        "config": dict(_GLM4, seq_length=8192, rope_ratio=1, boi_token_id=151339, eoi_token_id=151340,
                       vision_config={"hidden_size": 1792, "num_hidden_layers": 63, "num_heads": 16,
                                      "intermediate_size": 15360, "patch_size": 14, "image_size": 1120,
                                      "num_positions": 6401, "in_channels": 3, "layer_norm_eps": 1e-6,
                                      "hidden_act": "gelu", "scaling_factor": 8}),
    },
}


def known_config(name: str, layers: int | None = None) -> dict:
    """config.json fields of a released model; a clear error lists the known names.

    layers: fewer blocks, the same tensor shapes (quick runs of the scripts that build full-size models)."""
    key = name.lower().split("/")[-1]
    if key not in KNOWN:
        what = "no such directory, and not a known model name" if name.startswith((".", "/", "~")) else "unknown model name"
        raise ValueError(f"{name}: {what}; known: {', '.join(KNOWN)}")
    config = dict(KNOWN[key]["config"])
    if layers:
        config["num_layers" if "num_layers" in config else "num_hidden_layers"] = layers
    return config
