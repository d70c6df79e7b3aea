"""Safetensors read tensor by tensor, each on a private map of its own bytes of the file."""

import gc
import json
import struct
import sys

import pytest
import torch
from safetensors.torch import save_file

from lowvram.checkpoint import CheckpointError, read_safetensors


def _maps_of(path) -> int:
    with open("/proc/self/maps") as f:
        return sum(str(path) in line for line in f)


def test_values_private_writes_and_maps_released(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"w": torch.randn(300, 70, generator=g).half(), "b": torch.randn(70, generator=g).bfloat16(),
          "q": torch.randint(-2**31, 2**31 - 1, (50, 9), generator=g, dtype=torch.int32),
          "e": torch.zeros(0, 4), "z": torch.randint(0, 255, (13,), generator=g, dtype=torch.uint8)}
    f = tmp_path / "m.safetensors"
    save_file(sd, str(f))
    before = f.read_bytes()
    got = dict(read_safetensors(f, skip={"z"}))
    assert set(got) == {"w", "b", "q", "e"}
    for k, t in got.items():
        assert t.dtype == sd[k].dtype and torch.equal(t, sd[k]), k
    got["w"].mul_(2)  # the map is private: the file stays as it was
    got["q"][0, 0] = 7
    assert torch.equal(got["w"], sd["w"] * 2) and f.read_bytes() == before
    if sys.platform.startswith("linux"):
        assert _maps_of(f) > 0  # the tensors hold their maps...
        del got, t
        gc.collect()
        assert _maps_of(f) == 0  # ...and nothing of the file stays mapped once they go


def test_unaligned_offset_is_read_and_short_file_fails(tmp_path):
    """Offsets need not suit the dtype's alignment (the format does not require it): such a tensor is read."""
    a, h = torch.arange(3, dtype=torch.uint8), torch.tensor([[1.5, -2.0], [0.25, 8.0]], dtype=torch.float16)
    header = {"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "h": {"dtype": "F16", "shape": [2, 2], "data_offsets": [3, 11]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # data from a multiple of 8: "h" then starts at an odd byte
    f = tmp_path / "odd.safetensors"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + a.numpy().tobytes() + h.numpy().tobytes())
    got = dict(read_safetensors(f))
    assert torch.equal(got["a"], a) and torch.equal(got["h"], h)
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="odd.safetensors: tensor h is cut short"):
        dict(read_safetensors(f))
