"""Checkpoint conversion and quantization (installed as lowvram.converters)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_dead_temporaries(out: Path) -> None:
    """Temporary directories beside `out` left by runs that were killed (SIGKILL, out of memory): their name
    carries the writer's pid, so one whose process is gone is removed; one still being written is left alone."""
    for d in out.parent.glob(f".{out.name}.tmp-*-*"):
        pid = d.name[len(f".{out.name}.tmp-"):].partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)) and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


def public(path: Path) -> None:
    """Files readable as the umask allows (safetensors creates 0600 ones: a service account could not read them)."""
    mask = os.umask(0)
    os.umask(mask)
    path.chmod(0o666 & ~mask)


@contextlib.contextmanager
def atomic_directory(out: str | Path, replace: bool = True):
    """Yield a fresh temporary directory beside `out`; on success it becomes `out`, on any failure
    (Ctrl-C and SIGTERM included) it is removed, with any parent directories this call made, so no
    half-written output is ever left behind."""
    out = Path(out)
    made = next((p for p in reversed(out.parents) if not p.exists()), None)  # the top directory this call creates
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    except OSError as e:  # named as the user wrote it, not as the hidden temporary
        raise OSError(e.errno, f"cannot write here ({e.strerror})", str(out)) from None
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
        for d in [out.parent, *out.parent.parents] if made is not None else ():  # the parents this call made, if empty
            with contextlib.suppress(OSError):
                d.rmdir()
            if d == made:
                break
        raise
