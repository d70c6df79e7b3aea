"""Checkpoint conversion and quantization (installed as lowvram.converters)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(out: str | Path, replace: bool = True):
    """Yield a fresh temporary directory beside `out`; on success it becomes `out`, on any failure
    (Ctrl-C included) it is removed, so no half-written output is ever left behind."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        if out.exists():
            if not replace:
                raise FileExistsError(f"{out} exists")
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
