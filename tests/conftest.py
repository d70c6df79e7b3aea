import os
from pathlib import Path

import pytest
import torch

# Loads in tests build every linear from the checkpoint; the repack cache (lowvram/repack_cache.py) has its own
# tests, which turn it on with a cache directory of their own. LOWVRAM_CACHE=1 in the environment runs the suite with it.
os.environ.setdefault("LOWVRAM_CACHE", "0")
torch.manual_seed(0)
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "glm4-tiny"  # the trained example model


def need_reference(sub: str) -> Path:
    p = REFERENCE / sub
    if not p.exists():
        pytest.skip(f"reference data {p} not present (it lives in ../shared beside the checkout)")
    return p


def need_example() -> Path:
    if not EXAMPLE.exists():
        pytest.skip("examples/glm4-tiny not built (python examples/train_tiny.py)")
    return EXAMPLE


@pytest.fixture
def tiny(tmp_path):
    """Factory: tiny(generation, **kw) -> path of a fresh random checkpoint in the original layout."""
    from lowvram.converters.synthetic import write_random

    count = iter(range(1000))

    def make(generation="chatglm3-6b", **kw):
        return write_random(tmp_path / f"{generation}-{next(count)}", generation, **kw)

    return make
