"""The original modeling code's outputs (chatglm.cpp's test vectors), reproduced through `lowvram.load`.

Each .data file holds the weights of a tiny model and its final hidden states for a prefill and two
cached decode steps. We write the weights as a checkpoint in the original layout, load it the way a
user does, and replay the same three steps.
"""

import numpy as np
import pytest
import torch

import lowvram
from lowvram.converters.synthetic import write_checkpoint
from conftest import need_reference

TOL = 5e-4


class Reader:
    def __init__(self, path):
        self.buf = path.read_bytes()
        self.off = 0

    def take(self, shape, dtype=np.float32):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        a = np.frombuffer(self.buf, dtype=dtype, count=int(np.prod(shape)), offset=self.off).reshape(shape)
        self.off += n
        return torch.from_numpy(a.copy())

    def done(self):
        assert self.off == len(self.buf), f"{len(self.buf) - self.off} bytes left unread"


H, HEADS, V = 32, 8, 5


def glm1_case(path, ptuning):
    r = Reader(path)
    prefix = r.take((2, HEADS, 5, 4), np.float16) if ptuning else None
    sd = {"transformer.word_embeddings.weight": r.take((V, H))}
    p = "transformer.layers.0."
    for name, shape in [("input_layernorm.weight", (H,)), ("input_layernorm.bias", (H,)),
                        ("attention.query_key_value.weight", (3 * H, H)), ("attention.query_key_value.bias", (3 * H,)),
                        ("attention.dense.weight", (H, H)), ("attention.dense.bias", (H,)),
                        ("post_attention_layernorm.weight", (H,)), ("post_attention_layernorm.bias", (H,)),
                        ("mlp.dense_h_to_4h.weight", (128, H)), ("mlp.dense_h_to_4h.bias", (128,)),
                        ("mlp.dense_4h_to_h.weight", (H, 128)), ("mlp.dense_4h_to_h.bias", (H,))]:
        sd[p + name] = r.take(shape)
    sd["transformer.final_layernorm.weight"] = r.take((H,))
    sd["transformer.final_layernorm.bias"] = r.take((H,))
    sd["lm_head.weight"] = sd["transformer.word_embeddings.weight"]
    config = {"model_type": "chatglm", "hidden_size": H, "num_attention_heads": HEADS, "num_layers": 1,
              "vocab_size": V, "inner_hidden_size": 128, "layernorm_epsilon": 1e-5, "max_sequence_length": 64,
              "gmask_token_id": 1, "bos_token_id": 2, "mask_token_id": 4, "eos_token_id": 4,
              "position_encoding_2d": True}
    if ptuning:
        config["pre_seq_len"] = 5
        # [2L, heads, P, D] -> the prefix encoder's table [P, 2L*heads*D]
        sd["transformer.prefix_encoder.embedding.weight"] = prefix.float().permute(2, 0, 1, 3).reshape(5, -1)
    return config, sd, steps(r)


def glm2_case(path, ptuning, **extra):
    r = Reader(path)
    prefix = r.take((2, 2, 5, 4), np.float16) if ptuning else None
    sd = {"transformer.embedding.word_embeddings.weight": r.take((V, H))}
    p = "transformer.encoder.layers.0."
    for name, shape in [("input_layernorm.weight", (H,)), ("self_attention.query_key_value.weight", (48, H)),
                        ("self_attention.query_key_value.bias", (48,)), ("self_attention.dense.weight", (H, H)),
                        ("post_attention_layernorm.weight", (H,)), ("mlp.dense_h_to_4h.weight", (96, H)),
                        ("mlp.dense_4h_to_h.weight", (H, 48))]:
        sd[p + name] = r.take(shape)
    sd["transformer.encoder.final_layernorm.weight"] = r.take((H,))
    sd["transformer.output_layer.weight"] = torch.randn(V, H)  # not in the file: only hidden states are compared
    config = {"model_type": "chatglm", "hidden_size": H, "num_attention_heads": HEADS, "num_layers": 1,
              "padded_vocab_size": V, "multi_query_attention": True, "multi_query_group_num": 2, "kv_channels": 4,
              "ffn_hidden_size": 48, "layernorm_epsilon": 1e-5, "rmsnorm": True, "add_qkv_bias": True,
              "add_bias_linear": False, "seq_length": 64, **extra}
    if ptuning:
        config["pre_seq_len"] = 5
        sd["transformer.prefix_encoder.embedding.weight"] = prefix.float().permute(2, 0, 1, 3).reshape(5, -1)
    return config, sd, steps(r)


def steps(r):
    out = []
    for n, shape in [(3, (3, H)), (1, (H,)), (1, (H,))]:
        x = r.take((n,), np.int32)
        y = r.take(shape)
        out.append((x.tolist(), y.reshape(n, H)))
    r.done()
    return out


CASES = {
    "glm_model.data": lambda p: glm1_case(p, False),
    "glm_ptuning_v2_model.data": lambda p: glm1_case(p, True),
    "glm2_model.data": lambda p: glm2_case(p, False),
    "glm3_model.data": lambda p: glm2_case(p, False),
    "glm3_ptuning_v2_model.data": lambda p: glm2_case(p, True),
    "glm4_model.data": lambda p: glm2_case(p, False, rope_ratio=500, layernorm_epsilon=1.5625e-7),
}


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("fname", sorted(CASES))
def test_reference_hidden_states(fname, fmt, tmp_path):
    path = need_reference("chatglm_cpp") / fname
    config, sd, expected = CASES[fname](path)
    ckpt = write_checkpoint(tmp_path / "ckpt", config, sd, fmt=fmt, shards=2 if fmt == "bin" else 1)
    model = lowvram.load(ckpt, dtype="float32")
    ids, start = [], 0
    cache = model.new_cache(config.get("pre_seq_len", 0) + 5)
    for x, y in expected:
        ids += x
        h = model.forward(ids, start, len(x), cache)
        start += len(x)
        err = (h - y).abs().max().item()
        assert err < TOL, f"{fname} step at {start}: max abs error {err:.2e}"


def test_small_kernels_match_reference():
    d = need_reference("chatglm_cpp")
    r = Reader(d / "linear.data")
    w, b, x, y, vx, vy = r.take((32, 64)), r.take((32,)), r.take((2, 64)), r.take((2, 32)), r.take((64,)), r.take((32,))
    r.done()
    lin = torch.nn.Linear(64, 32)
    lin.weight.data, lin.bias.data = w, b
    assert (lin(x) - y).abs().max() < 1e-5 and (lin(vx) - vy).abs().max() < 1e-5

    from lowvram.config import parse_config
    from lowvram.models.glm import Norm

    for fname, kind in [("layer_norm.data", "layernorm"), ("rms_norm.data", "rmsnorm")]:
        r = Reader(d / fname)
        w = r.take((64,))
        b = r.take((64,)) if kind == "layernorm" else None
        x, y = r.take((3, 64)), r.take((3, 64))
        r.done()
        cfg = parse_config({"model_type": "chatglm", "hidden_size": 64, "num_attention_heads": 1, "num_layers": 1,
                            "padded_vocab_size": 8, "ffn_hidden_size": 8, "layernorm_epsilon": 1e-5})
        cfg.norm = kind
        norm = Norm(cfg)
        norm.weight.data = w
        if b is not None:
            norm.bias.data = b
        assert (norm(x) - y).abs().max() < 1e-5, fname
