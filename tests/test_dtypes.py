"""Half-precision checkpoints load and agree with fp32 to half-precision accuracy."""

import pytest
import torch

import lowvram
from lowvram.converters.synthetic import TINY


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("gen", list(TINY))
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_checkpoints(gen, half, tiny):
    ids = [9, 4, 30, 151, 152] if gen == "chatglm-6b" else [9, 4, 30, 17]
    ref = lowvram.load(tiny(gen, seed=1), dtype="float32").logits(ids)
    hdir = tiny(gen, seed=1, dtype=half, fmt="bin" if half == torch.float16 else "safetensors")
    m32 = lowvram.load(hdir, dtype="float32")
    assert m32.dtype == torch.float32 and m32.net.embed(torch.tensor([1])).dtype == torch.float32
    tol = 2e-3 if half == torch.float16 else 2e-2
    assert rel(m32.logits(ids), ref) < tol
    mh = lowvram.load(hdir, dtype=half)
    assert mh.net.layers[0].attn.qkv.weight.dtype == half
    assert rel(mh.logits(ids), ref) < (1e-2 if half == torch.float16 else 5e-2)
    assert lowvram.load(hdir).dtype == torch.bfloat16  # CPU default
