"""`lowvram bench` through the installed console script, on a tiny quantized model."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lowvram.config import load_config
from lowvram.converters.quantize import quantize
from lowvram.kernels import native


def _lowvram():
    exe = shutil.which("lowvram") or str(Path(sys.executable).parent / "lowvram")
    if not Path(exe).exists():
        pytest.skip("console script `lowvram` not installed (pip install -e .)")
    return exe


def test_bench_json(tiny, tmp_path):
    out = tmp_path / "q"
    quantize(tiny("glm-4-9b-chat"), out, bits=4, group_size=32, progress=False)
    r = subprocess.run([_lowvram(), "bench", str(out), "--prompt-len", "8", "--decode-steps", "3", "--threads", "1",
                        "--kv-int8", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["generation"] == load_config(out).generation and d["prompt_len"] == 8 and d["threads"] == 1
    assert d["prefill_tok_s"] > 0 and d["decode_ms_median"] >= d["decode_ms_min"] > 0 and d["decode_steps"] == 3
    assert d["ttft_s"] > 0 and d["ttft_cold_s"] > 0 and d["load_s"] > 0
    assert d["peak_rss_bytes"] >= d["peak_rss_after_load_bytes"] > 0
    assert d["cuda_graph"] is False and d["kv_int8"] is True
    # every block linear is quantized and counted by the backend module that ran it
    assert sum(d["kernels"].values()) == 4 * load_config(out).num_layers, d["kernels"]
    if "native" in d["kernels"]:  # and the native kernel's path on this CPU is named
        assert d["native_path"] == native.isa() and d["native_path"] in native.ISAS
    assert abs(d["predicted_rss_bytes"] / d["peak_rss_bytes"] - 1) < 0.10


def test_bench_plain_text_and_errors(tiny, tmp_path):
    out = tmp_path / "q"
    quantize(tiny("chatglm3-6b"), out, bits=8, group_size=32, progress=False)
    r = subprocess.run([_lowvram(), "bench", str(out), "--prompt-len", "4", "--decode-steps", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "decode" in r.stdout and "ms/token median" in r.stdout and "prefill" in r.stdout
    assert "\n  kernels " in r.stdout  # which quantized-linear backend ran
    r = subprocess.run([_lowvram(), "bench", str(out), "--prompt-len", "4", "--decode-steps", "2", "--cuda-graph"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "--cuda-graph needs the whole model on one CUDA device" in r.stderr
    r = subprocess.run([_lowvram(), "bench", str(tmp_path / "missing")], capture_output=True, text=True)
    assert r.returncode != 0 and "missing" in r.stderr


def test_bench_roofline_pairs(tiny, tmp_path):
    """--roofline N: N more steps, each against the bandwidth probed just before it, over the bytes a step streams
    (every weight but the word embeddings, quantized linears at their packed size)."""
    import lowvram
    from lowvram.bench import streamed_bytes

    out = tmp_path / "q"
    quantize(tiny("glm-4-9b-chat", hidden_size=128, kv_channels=32, ffn_hidden_size=256), out, bits=4, group_size=128,
             progress=False)
    r = subprocess.run([_lowvram(), "bench", str(out), "--prompt-len", "8", "--decode-steps", "2", "--roofline", "3",
                        "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert len(d["roofline_ratios"]) == 3 and all(x > 0 for x in d["roofline_ratios"])
    assert d["roofline_ratio_paired"] == sorted(d["roofline_ratios"])[1]
    net = lowvram.load(out, tokenizer=False).net
    floats = sum(t.numel() * t.element_size() for t in (*net.parameters(), *net.buffers()) if t is not net.embed.weight)
    packed = sum(m.nbytes() for m in net.modules() if callable(getattr(m, "nbytes", None)))
    assert packed > 0 and d["streamed_bytes"] == streamed_bytes(net) == packed + floats
    r = subprocess.run([_lowvram(), "bench", str(out), "--prompt-len", "4", "--decode-steps", "2", "--roofline", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "x (median over 2 steps" in r.stdout, r.stderr


@pytest.mark.parametrize("flag,value,least", [("--decode-steps", "0", 1), ("--prompt-len", "-3", 1),
                                              ("--threads", "0", 1), ("--roofline", "-1", 0)])
def test_bench_counts_are_checked_before_the_load(flag, value, least, tmp_path, capsys):
    """Each would fail after the load (no median of no steps, a negative tensor size) or measure nothing; the
    model path does not even exist: the flags are refused first."""
    from lowvram.cli import main

    assert main(["bench", str(tmp_path / "not-loaded"), flag, value]) == 1
    err = capsys.readouterr().err
    assert err == f"lowvram: error: {flag} must be >= {least}, got {value}\n"
