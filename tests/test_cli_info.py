"""`lowvram info` through the installed console script."""

import json
import shutil
import subprocess
import sys

from lowvram.converters.synthetic import TINY, state_shapes

EXE = shutil.which("lowvram")
CMD = [EXE] if EXE else [sys.executable, "-m", "lowvram.cli"]


def test_info_plain_and_json(tiny):
    d = tiny("chatglm3-6b", shards=2)
    r = subprocess.run(CMD + ["info", str(d)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "chatglm2-6b" in r.stdout and "2 file(s)" in r.stdout
    r = subprocess.run(CMD + ["info", str(d), "--json"], capture_output=True, text=True)
    info = json.loads(r.stdout)
    expect = 0
    for shape in state_shapes(TINY["chatglm3-6b"]).values():
        n = 1
        for s in shape:
            n *= s
        expect += n
    assert info["parameters"] == expect
    assert info["size_on_disk"] == sum(f.stat().st_size for f in d.glob("model-*.safetensors"))
    assert info["tensors"] == len(state_shapes(TINY["chatglm3-6b"]))
    assert info["layers"] == 2 and info["kv_heads"] == 2
    assert info["generation"] == "chatglm2-6b" and info["dtypes"] == {"float32": info["tensors"]}


def test_info_error_is_one_line(tmp_path):
    r = subprocess.run(CMD + ["info", str(tmp_path / "nope")], capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip().startswith("lowvram: error:") and len(r.stderr.strip().splitlines()) == 1


def test_missing_directory_and_plain_file(tmp_path, monkeypatch):
    """`info` and `cache` on a path that is not there, or is a file, say which; lowvram.load says the same."""
    import pytest

    import lowvram

    monkeypatch.setenv("LOWVRAM_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    for cmd in ("info", "cache"):
        r = subprocess.run(CMD + [cmd, str(tmp_path / "nope")], capture_output=True, text=True)
        assert r.returncode == 1 and "nope: no such directory" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    r = subprocess.run(CMD + ["info", str(f)], capture_output=True, text=True)
    assert r.returncode == 1 and "notes.txt: a file, not a checkpoint directory" in r.stderr, r.stderr
    r = subprocess.run(CMD + ["cache", str(f)], capture_output=True, text=True)
    assert r.returncode == 1 and "notes.txt: not a directory" in r.stderr, r.stderr
    with pytest.raises(lowvram.ConfigError, match="nope: no such directory"):
        lowvram.load(tmp_path / "nope")
    with pytest.raises(lowvram.ConfigError, match="notes.txt: a file, not a checkpoint directory"):
        lowvram.load(f)


def test_parameters_of_a_checkpoint_with_mixed_bits(tiny, tmp_path):
    """A 4-bit checkpoint with an 8-bit output layer counts the parameters of its float source."""
    from lowvram.converters.quantize import quantize
    from lowvram.info import describe

    src = tiny("chatglm3-6b")
    quantize(src, tmp_path / "q", bits=4, group_size=32, quantize_head=True, progress=False)
    assert describe(tmp_path / "q")["parameters"] == describe(src)["parameters"]


def test_output_into_a_closed_pipe_ends_quietly(tiny):
    """`lowvram info --tensors | head -1`: the reader is gone; no traceback or error line, the exit status SIGPIPE's."""
    import os

    d = tiny("chatglm3-6b")
    r, w = os.pipe()
    os.close(r)  # the reader left before anything was written: every write fails (EPIPE)
    try:
        p = subprocess.run(CMD + ["info", str(d), "--tensors"], stdout=w, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(w)
    assert p.returncode == 141 and p.stderr == "", p.stderr
