"""THUDM's released INT4/INT8 layout (`quantization_bit`, `weight` + `weight_scale`), built the way
the original quantization.py builds it, loads packed and equals its dequantized fp32 model."""

import pytest
import torch

import lowvram
from lowvram.converters.synthetic import TINY, random_state, write_checkpoint
from lowvram.kernels import PackedWeight, dequantize
from lowvram.quantized import from_thudm

LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def thudm_pack_int4(w_int: torch.Tensor) -> torch.Tensor:
    """As the original compress_int4_weight: byte j of a row = (col 2j << 4) | (col 2j+1 & 0xF)."""
    hi, lo = w_int[:, 0::2], w_int[:, 1::2]
    return ((hi << 4) | (lo & 0x0F)).to(torch.int8)


def thudm_quantize(fp: dict, bits: int) -> tuple[dict, dict]:
    """(THUDM checkpoint state, the fp32 state of its dequantized weights), per the original code:
    weight_scale = absmax / (2^(bits-1) - 1) per row in fp16, weight = round(w / scale) as int8."""
    qsd, deq = {}, {}
    maxq = 2 ** (bits - 1) - 1
    for name, t in fp.items():
        if "layers." in name and name.endswith(".weight") and name.split(".")[-2] in LINEARS:
            scale = (t.abs().amax(dim=1) / maxq).half()
            w_int = torch.round(t / scale.float()[:, None]).clamp(-maxq, maxq).to(torch.int8)
            qsd[name] = thudm_pack_int4(w_int) if bits == 4 else w_int
            qsd[name[: -len("weight")] + "weight_scale"] = scale
            deq[name] = w_int.float() * scale.float()[:, None]
        else:
            qsd[name] = deq[name] = t
    return qsd, deq


def resident_block_bytes(model) -> int:
    """Bytes the loaded model holds for its blocks: parameters, buffers and packed weights."""
    total = 0
    for mod in model.net.layers.modules():
        ts = list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))
        total += sum(t.numel() * t.element_size() for t in ts)
        if isinstance(getattr(mod, "w", None), PackedWeight):
            total += mod.w.nbytes()
    return total


@pytest.mark.parametrize("gen", ["chatglm-6b", "chatglm2-6b"])
@pytest.mark.parametrize("bits", [4, 8])
def test_thudm_checkpoint_equals_its_dequantized_fp32_model(gen, bits, tmp_path):
    config = dict(TINY[gen], hidden_size=128, kv_channels=32) if gen != "chatglm-6b" else dict(TINY[gen], hidden_size=128)
    qsd, deq = thudm_quantize(random_state(config, seed=3), bits)
    qdir = write_checkpoint(tmp_path / "int", dict(config, quantization_bit=bits), qsd)
    fdir = write_checkpoint(tmp_path / "fp", config, deq)
    mq, mf = lowvram.load(qdir, dtype="float32"), lowvram.load(fdir, dtype="float32")
    ids = [5, 7, 151, 152, 9] if gen == "chatglm-6b" else [3, 9, 27, 81, 5]
    assert torch.equal(mq.logits(ids), mf.logits(ids))
    kw = dict(max_new_tokens=3, stop_token_ids=[])
    assert mq.generate(ids, **kw) == mf.generate(ids, **kw)
    # In memory the block weights stay packed: about bits/16 of their fp16 size (+ scales, norms, biases).
    fp16 = sum(t.numel() * 2 for n, t in deq.items() if "layers." in n)
    assert resident_block_bytes(mq) < fp16 * (0.33 if bits == 4 else 0.58), (resident_block_bytes(mq), fp16)


def test_thudm_nibble_order():
    w = torch.tensor([[1, -2, 7, -7, 0, 3, -1, 5]] * 8, dtype=torch.int8)
    pw = from_thudm({"weight": thudm_pack_int4(w), "weight_scale": torch.ones(8).half()}, 4, 8)
    assert dequantize(pw).tolist() == [[1.0, -2.0, 7.0, -7.0, 0.0, 3.0, -1.0, 5.0]] * 8


def test_thudm_without_scale_names_the_tensor(tmp_path):
    config = dict(TINY["chatglm2-6b"], quantization_bit=8)
    qsd, _ = thudm_quantize(random_state(config, seed=1), 8)
    qsd.pop("transformer.encoder.layers.0.mlp.dense_4h_to_h.weight_scale")
    with pytest.raises(Exception, match=r"transformer\.encoder\.layers\.0\.mlp\.dense_4h_to_h: .*weight_scale"):
        lowvram.load(write_checkpoint(tmp_path / "bad", config, qsd), dtype="float32")


@pytest.mark.parametrize("bits", [4, 8])
def test_thudm_quantized_embeddings_equal_their_dequantized_fp32_model(bits, tmp_path):
    """chatglm-6b-int4-qe: `quantization_embeddings` also quantizes the word embeddings (a scale per row,
    as the original's QuantizedEmbedding), and its lm_head is a quantized linear over the same ints
    (one storage for both names in the original's pytorch_model.bin)."""
    config = dict(TINY["chatglm-6b"], hidden_size=128)
    qsd, deq = thudm_quantize(random_state(config, seed=4), bits)
    name = "transformer.word_embeddings.weight"
    maxq = 2 ** (bits - 1) - 1
    t = deq[name]
    scale = (t.abs().amax(dim=1) / maxq).half()
    w_int = torch.round(t / scale.float()[:, None]).clamp(-maxq, maxq).to(torch.int8)
    qsd[name] = qsd["lm_head.weight"] = thudm_pack_int4(w_int) if bits == 4 else w_int
    qsd[name + "_scale"] = qsd["lm_head.weight_scale"] = scale
    deq[name] = deq["lm_head.weight"] = w_int.float() * scale.float()[:, None]
    qdir = write_checkpoint(tmp_path / "qe", dict(config, quantization_bit=bits, quantization_embeddings=True),
                            qsd, fmt="bin")
    fdir = write_checkpoint(tmp_path / "fp", config, deq)
    mq, mf = lowvram.load(qdir, dtype="float32"), lowvram.load(fdir, dtype="float32")
    ids = [5, 7, 151, 152, 9]
    assert torch.equal(mq.logits(ids), mf.logits(ids))
    kw = dict(max_new_tokens=3, stop_token_ids=[])
    assert mq.generate(ids, **kw) == mf.generate(ids, **kw)
    # The table stays packed (bits/8 bytes per value) and the head is a quantized linear, not a float copy.
    emb = mq.net.embed
    assert emb.weight.dtype == torch.int8 and emb.weight.numel() == config["vocab_size"] * 128 * bits // 8
    assert isinstance(getattr(mq.net.output, "w", None), PackedWeight)
    # The default (fast) dtype runs the same checkpoint through the CPU kernels, close to the reference.
    fast = lowvram.load(qdir)
    got, ref = fast.logits(ids).float(), mf.logits(ids)
    assert ((got - ref).norm() / ref.norm()).item() < 0.02


def test_thudm_quantized_embeddings_misshaped_names_the_tensor(tmp_path):
    config = dict(TINY["chatglm-6b"], hidden_size=128)
    qsd, _ = thudm_quantize(random_state(config, seed=5), 4)
    name = "transformer.word_embeddings.weight"
    qsd[name] = torch.zeros(config["vocab_size"], 128, dtype=torch.int8)  # int8-sized rows under quantization_bit 4
    qsd[name + "_scale"] = torch.ones(config["vocab_size"]).half()
    qdir = write_checkpoint(tmp_path / "bad", dict(config, quantization_bit=4, quantization_embeddings=True), qsd)
    with pytest.raises(Exception, match=r"transformer\.word_embeddings .*expected \(160, 64\)"):
        lowvram.load(qdir, dtype="float32")
