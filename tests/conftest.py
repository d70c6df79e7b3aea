import os
from pathlib import Path

import pytest
import torch

torch.manual_seed(0)
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference"


def need_reference(sub: str) -> Path:
    p = REFERENCE / sub
    if not p.exists():
        pytest.skip(f"reference data {p} not present (it lives in ../shared beside the checkout)")
    return p


@pytest.fixture
def tiny(tmp_path):
    """Factory: tiny(generation, **kw) -> path of a fresh random checkpoint in the original layout."""
    from lowvram.converters.synthetic import write_random

    count = iter(range(1000))

    def make(generation="chatglm3-6b", **kw):
        return write_random(tmp_path / f"{generation}-{next(count)}", generation, **kw)

    return make
