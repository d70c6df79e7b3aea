"""The repack cache: a second CPU load maps the native kernel's tensors from the file the first one wrote."""

import os
from pathlib import Path

import pytest
import torch

import lowvram
from lowvram import repack_cache
from lowvram.converters.quantize import quantize
from lowvram.kernels import native

pytestmark = [pytest.mark.skipif(native.available() is not None or not native.fast(),
                                 reason="the repack cache holds the native kernel's layout, not built or not fast here"),
              pytest.mark.skipif(not repack_cache.platform_ok(), reason="the repack cache is Linux-only (mmap flags, "
                                 "posix_fallocate, /proc)")]

SHAPES = dict(hidden_size=128, kv_channels=32, ffn_hidden_size=256, padded_vocab_size=512)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    import shutil

    if shutil.disk_usage(tmp_path).free < (5 << 30) // 4:
        pytest.skip(f"{tmp_path}: under 1.25 GiB free, and the cache is not written with less than its size + 1 GiB")
    d = tmp_path / "cache"
    monkeypatch.setenv("LOWVRAM_CACHE", "1")
    monkeypatch.setenv("LOWVRAM_CACHE_DIR", str(d))
    return d


def mapped_files(t: torch.Tensor) -> set[tuple[str, str]]:
    """(file, permissions) of the mappings that hold this tensor's first byte (from /proc/self/maps)."""
    p = t.data_ptr()
    out = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= p < hi and len(parts) > 5:
            out.add((parts[5], parts[1]))
    return out


def natives(m):
    return {n: mod for n, mod in m.net.named_modules() if isinstance(mod, native.NativeLinear)}


def direct_writes(monkeypatch, on: bool):
    """Make the next loads take the O_DIRECT way (as for a model larger than the page cache takes dirty) or not."""
    monkeypatch.setattr(repack_cache, "dirty_headroom", lambda: 0 if on else 1 << 60)


@pytest.mark.parametrize("bits,method,direct", [(4, "rtn", False), (8, "rtn", False), (4, "gptq", False),
                                                (4, "rtn", True), (8, "rtn", True), (4, "gptq", True)])
def test_second_load_maps_what_the_first_repacked(tiny, tmp_path, cache, monkeypatch, bits, method, direct):
    src = tiny("chatglm3-6b", **SHAPES)
    out = tmp_path / "q"
    kw = dict(act_order=True, calib_samples=2, calib_seq_len=16) if method == "gptq" else {}
    quantize(src, out, bits=bits, method=method, group_size=32, progress=False, **kw)
    ids = list(range(3, 30))
    direct_writes(monkeypatch, direct)
    first = lowvram.load(out)
    assert first.report["repack_cache"].startswith("written to ")
    assert ("written directly" in first.report["repack_cache"]) == direct
    files = list(cache.glob("*.lvq"))
    assert len(files) == 1 and not list(cache.glob(".*.tmp"))
    # mapped: one shared mapping holds every linear of the first load (not one mapping and descriptor per linear);
    # direct: the first load computes from ordinary memory, the file was written beside it
    maps = sum(line.endswith(str(files[0])) for line in Path("/proc/self/maps").read_text().splitlines())
    assert maps == (0 if direct else 1)
    second = lowvram.load(out)
    assert second.report["repack_cache"] == f"mapped from {files[0]}"
    a, b = natives(first), natives(second)
    assert a.keys() == b.keys() and "output" in b  # the float head's int8 rows are cached too
    if method == "gptq":
        assert a["layers.0.mlp.up"].perm is not None
    for name, mod in b.items():
        # the first load repacked into the file (a shared mapping) or beside it, the second maps it privately
        held = mapped_files(a[name].weight)
        assert (not any(f.endswith(".lvq") for f, _ in held)) if direct else held == {(str(files[0]), "rw-s")}, name
        for t in ("weight", "scales", "zeros"):
            assert mapped_files(getattr(mod, t)) == {(str(files[0]), "rw-p")}, (name, t)
        for t in ("weight", "scales", "zeros", "bias", "perm"):
            x, y = getattr(a[name], t), getattr(mod, t)
            assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), (name, t)
    assert torch.equal(first.logits(ids), second.logits(ids))
    assert first.generate(ids, max_new_tokens=6) == second.generate(ids, max_new_tokens=6)


def test_direct_writes_that_fail_leave_no_file_and_the_load_goes_on(tiny, tmp_path, cache, monkeypatch):
    """A write error in the writer thread (a full disk, say) abandons the file; the model still runs."""
    import errno
    import threading

    out = tmp_path / "q"
    quantize(tiny("chatglm3-6b", **SHAPES), out, bits=4, group_size=32, progress=False)
    ids = list(range(3, 30))
    ref = lowvram.load(out, repack_cache=False).logits(ids)
    direct_writes(monkeypatch, True)
    real, calls = repack_cache._pwrite_all, []

    def fails_third(fd, buf, off):
        calls.append(off)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, buf, off)

    monkeypatch.setattr(repack_cache, "_pwrite_all", fails_third)
    m = lowvram.load(out)
    assert m.report["repack_cache"] == "not written: [Errno 28] No space left on device"
    assert not list(cache.glob("*.lvq")) and not list(cache.glob(".*.tmp"))
    assert not any(t.name == "lowvram-cache-writer" for t in threading.enumerate())
    assert torch.equal(m.logits(ids), ref)
    monkeypatch.setattr(repack_cache, "_pwrite_all", real)
    assert lowvram.load(out).report["repack_cache"].startswith("written to ")
    assert torch.equal(lowvram.load(out).logits(ids), ref)


@pytest.mark.parametrize("direct", [False, True])
def test_a_load_interrupted_midway_leaves_nothing_behind(tiny, tmp_path, cache, monkeypatch, direct):
    """Ctrl-C while the linears are being repacked: no temporary file, no writer thread left; the next load writes."""
    import threading

    out = tmp_path / "q"
    quantize(tiny("chatglm3-6b", **SHAPES), out, bits=4, group_size=32, progress=False)
    direct_writes(monkeypatch, direct)
    real, built = native.NativeLinear._ready, []

    def interrupted(self):
        built.append(self)
        if len(built) == 5:
            raise KeyboardInterrupt
        real(self)

    monkeypatch.setattr(native.NativeLinear, "_ready", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lowvram.load(out)
    assert len(built) == 5
    assert not list(cache.glob("*.lvq")) and not list(cache.glob(".*.tmp"))
    assert not any(t.name == "lowvram-cache-writer" for t in threading.enumerate())
    monkeypatch.setattr(native.NativeLinear, "_ready", real)
    assert lowvram.load(out).report["repack_cache"].startswith("written to ")


def test_the_dirty_headroom_is_read_from_the_kernel():
    room = repack_cache.dirty_headroom()
    total = int(Path("/proc/meminfo").read_text().split()[1]) << 10
    assert room is not None and room < total


def test_a_changed_checkpoint_is_repacked_again(tiny, tmp_path, cache):
    """Same shapes, same sizes, rewritten at once: the sampled bytes tell the files apart, and the stale cache goes."""
    out = tmp_path / "q"
    ids = list(range(3, 30))
    quantize(tiny("chatglm3-6b", **SHAPES), out, bits=4, group_size=32, progress=False)
    lowvram.load(out)
    old = set(cache.glob("*.lvq"))
    quantize(tiny("chatglm3-6b", seed=7, **SHAPES), out, bits=4, group_size=32, progress=False, force=True)
    m = lowvram.load(out)
    assert m.report["repack_cache"].startswith("written to ")
    new = set(cache.glob("*.lvq"))
    assert len(new) == 1 and not new & old
    os.environ["LOWVRAM_CACHE"] = "0"
    try:
        ref = lowvram.load(out)
    finally:
        os.environ["LOWVRAM_CACHE"] = "1"
    assert "repack_cache" not in ref.report
    assert not any(f.endswith(".lvq") for f, _ in mapped_files(ref.net.layers[0].mlp.up.weight))  # ordinary memory
    assert torch.equal(m.logits(ids), ref.logits(ids))
    assert lowvram.load(out).report["repack_cache"].startswith("mapped from ")


def test_a_cache_file_cut_short_is_ignored_and_rewritten(tiny, tmp_path, cache):
    out = tmp_path / "q"
    quantize(tiny("chatglm3-6b", **SHAPES), out, bits=4, group_size=32, progress=False)
    ids = list(range(3, 30))
    ref = lowvram.load(out).logits(ids)
    f = next(cache.glob("*.lvq"))
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 4096)
    m = lowvram.load(out)
    assert m.report["repack_cache"].startswith("written to ")
    assert torch.equal(m.logits(ids), ref)
    f.write_bytes(b"not a cache")
    assert lowvram.load(out).report["repack_cache"].startswith("written to ")


def test_what_the_cache_is_keyed_on_and_when_it_is_off(tiny, tmp_path, cache, monkeypatch):
    out = tmp_path / "q"
    quantize(tiny("chatglm3-6b", **SHAPES), out, bits=4, group_size=32, progress=False)
    exact = lowvram.load(out, dtype="float32")  # the reference path builds no native linear
    assert exact.report["repack_cache"] == "nothing to cache (the 'torch' backend repacks nothing)"
    assert not cache.exists()  # not even a temporary file was made
    if __import__("lowvram.kernels.ort", fromlist=["available"]).available() is None:
        assert lowvram.load(out, backend="ort").report["repack_cache"].startswith("nothing to cache")
        assert not cache.exists()
    lowvram.load(out)
    monkeypatch.setenv("LOWVRAM_QUANTIZE_HEAD", "0")  # changes what is built: another key
    m = lowvram.load(out)
    assert m.report["repack_cache"].startswith("written to ") and type(m.net.output) is torch.nn.Linear
    assert len(list(cache.glob("*.lvq"))) == 1  # the directory's previous cache was replaced
    monkeypatch.setenv("LOWVRAM_CACHE", "0")
    assert "repack_cache" not in lowvram.load(out).report
    assert lowvram.load(out, repack_cache=True).report["repack_cache"].startswith("mapped from ")  # the API wins
    monkeypatch.setenv("LOWVRAM_CACHE", "1")
    assert "repack_cache" not in lowvram.load(out, repack_cache=False).report
    monkeypatch.setenv("LOWVRAM_CACHE_DIR", str(tmp_path / "file"))
    (tmp_path / "file").write_text("x")  # a cache directory that cannot be made: the load still works
    m = lowvram.load(out)
    assert m.report["repack_cache"].startswith("not written: ")


def test_gptq_sampling_from_a_temporary_int8_copy_caches_nothing(tiny, tmp_path, cache):
    """GPTQ may sample its calibration text from an INT8 copy in its temporary directory: loaded once, then gone."""
    quantize(tiny("chatglm3-6b", **SHAPES), tmp_path / "q", bits=4, method="gptq", group_size=32, progress=False,
             calib_samples=2, calib_seq_len=16, calib_model="int8")
    assert not list(cache.glob("*")) if cache.exists() else True


@pytest.mark.parametrize("direct", [False, True])
def test_two_threads_loading_at_once_and_files_of_dead_loads(tiny, tmp_path, cache, monkeypatch, direct):
    """Each load writes its own temporary file (process and thread in the name), renamed when complete; a
    temporary file whose process is gone is removed by the next load that writes."""
    import threading

    direct_writes(monkeypatch, direct)
    out = tmp_path / "q"
    quantize(tiny("chatglm3-6b", **SHAPES), out, bits=4, group_size=32, progress=False)
    cache.mkdir()
    dead = cache / ".repacked-0-0.lvq.999999999.1.tmp"  # no such pid
    live = cache / f".repacked-0-0.lvq.{os.getpid()}.1.tmp"
    dead.write_bytes(b"x")
    live.write_bytes(b"x")
    models = [None, None]

    def load(i):
        models[i] = lowvram.load(out)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(m.report["repack_cache"].startswith("written to ") for m in models)
    assert not dead.exists() and live.exists()
    assert len(list(cache.glob("*.lvq"))) == 1 and set(cache.glob(".*.tmp")) == {live}
    third = lowvram.load(out)
    assert third.report["repack_cache"].startswith("mapped from ")
    ids = list(range(3, 30))
    ref = third.logits(ids)
    assert all(torch.equal(m.logits(ids), ref) for m in models)


def test_the_caches_of_deleted_checkpoints_go_at_the_next_write(tiny, tmp_path, cache, capsys):
    """... and those an older lowvram wrote in another format, which this one never reads."""
    import json
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        quantize(tiny("chatglm3-6b", **SHAPES), d, bits=4, group_size=32, progress=False)
    lowvram.load(a)
    first = set(cache.glob("*.lvq"))
    old = cache / "repacked-0123456789abcdef-0123456789abcdef.lvq"  # format 2, of a checkpoint that still exists
    index = json.dumps({"format": 2, "modules": {}, "meta": {}, "data_end": 0, "checkpoint": str(b)}).encode()
    old.write_bytes(index + len(index).to_bytes(8, "little") + repack_cache.MAGIC)
    assert lowvram.load(a).report["repack_cache"].startswith("mapped from ")  # reading removes nothing
    assert old.exists()
    from lowvram.cli import main

    assert main(["cache", str(b)]) == 0
    assert "(format 2: an older lowvram's, unused)" in capsys.readouterr().out
    shutil.rmtree(a)
    lowvram.load(b)  # writes b's cache, removes a's and the old format's
    left = set(cache.glob("*.lvq"))
    assert len(first) == 1 and len(left) == 1 and not left & first and not old.exists()


def test_the_cache_command_lists_and_clears(tiny, tmp_path, cache, capsys):
    from lowvram.cli import main

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        quantize(tiny("chatglm3-6b", **SHAPES), d, bits=4, group_size=32, progress=False)
        lowvram.load(d)
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert f"{cache}: 2 cache file(s)" in out and str(a.resolve()) in out and str(b.resolve()) in out
    assert main(["cache", "--clear", str(a)]) == 0
    assert "removed 1 cache file(s)" in capsys.readouterr().out
    assert lowvram.load(a).report["repack_cache"].startswith("written to ")  # a's was gone
    assert lowvram.load(b).report["repack_cache"].startswith("mapped from ")  # b's was kept
    assert main(["cache", "--clear"]) == 0 and not list(cache.glob("*.lvq"))
