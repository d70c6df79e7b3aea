"""Memory model, planner, `lowvram plan`, and execution split across placement targets."""

import argparse
import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch

import lowvram
from lowvram.config import parse_config
from lowvram.known import known_config
from lowvram.memory import footprint
from lowvram.placement import budgets_from_arguments, check_budgets, parse_max_memory, parse_size, plan

GiB = 1 << 30


def test_sizes():
    assert parse_size("6GiB") == 6 * GiB and parse_size("8GB") == 8 * 10**9 and parse_size("512MiB") == 512 << 20
    assert parse_max_memory("cuda:0=6GiB,cpu=12GiB") == {"cuda:0": 6 * GiB, "cpu": 12 * GiB}
    with pytest.raises(ValueError, match="not understood"):
        parse_size("six gigs")
    # a string without a unit would be bytes: refused (a dict's numbers are bytes, and 0 is 0 in any unit)
    with pytest.raises(ValueError, match=r"memory size '6' needs a unit, e\.g\. 6GiB"):
        parse_size("6")
    for bad in (".", "1.2.3GiB", "-1GiB"):
        with pytest.raises(ValueError, match=f"memory size '{re.escape(bad)}' not understood"):
            parse_size(bad)
    assert parse_size("0") == 0 and parse_size(".5GiB") == GiB // 2 and parse_size(6e9) == 6 * 10**9
    assert check_budgets({"cpu": 4096, "cuda": "1GiB"}) == {"cpu": 4096, "cuda:0": GiB}


def flags(max_memory=None, gpu_mem=None):
    return argparse.Namespace(max_memory=max_memory, gpu_mem=gpu_mem, stream=False)


def test_budget_flags():
    """--max-memory / --gpu-mem: each device once, sizes with units, more than the device's runtime takes."""
    assert budgets_from_arguments(flags()) is None
    assert budgets_from_arguments(flags("cuda=3GiB,cpu=8GiB")) == {"cuda:0": 3 * GiB, "cpu": 8 * GiB}
    got = budgets_from_arguments(flags(gpu_mem="6GiB"))
    assert got["cuda:0"] == 6 * GiB and got["cpu"] > 0  # the rest detected
    cases = [(flags("cpu=4GiB,cpu=8GiB"), "--max-memory 'cpu=4GiB,cpu=8GiB': cpu given twice"),
             (flags("cuda=4GiB,cuda:0=3GiB,cpu=8GiB"), "cuda:0 given twice"),
             (flags("cuda:0=4GiB,cpu=8GiB", "6GiB"), "--gpu-mem sets cuda:0, which --max-memory sets too"),
             (flags(gpu_mem="6"), "--gpu-mem: memory size '6' needs a unit, e.g. 6GiB"),
             (flags("cpu=12"), "--max-memory: memory size '12' needs a unit"),
             (flags(gpu_mem="."), "--gpu-mem: memory size '.' not understood"),
             (flags(gpu_mem="0"), "cuda:0 budget of 0 bytes: not more than the ~500 MiB its runtime takes"),
             (flags("cpu=100MiB"), "cpu budget of 104857600 bytes: not more than the ~350 MiB its runtime takes")]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            budgets_from_arguments(args)
        assert len(str(e.value).splitlines()) == 1


def test_footprint_matches_a_real_quantized_checkpoint(tiny, tmp_path):
    from lowvram.converters.quantize import quantize
    from lowvram.checkpoint import Checkpoint

    src = tiny("chatglm3-6b", hidden_size=128, kv_channels=32, ffn_hidden_size=256)
    out = quantize(src, tmp_path / "q", bits=4, group_size=32, progress=False)["out"]
    ck = Checkpoint(out)
    layer0 = sum(ck.get(n).numel() * ck.get(n).element_size() for n in ck.names() if ".layers.0." in n)
    fp = footprint(lowvram.load_config(out), bits=4, group=32, dtype="float16")
    assert abs(fp.block_weights - layer0) / layer0 < 0.1


def cfg(name):
    return parse_config(known_config(name))


def test_fits_entirely_on_gpu():
    p = plan(cfg("chatglm3-6b"), {"cuda:0": 8 * GiB, "cpu": 16 * GiB}, ctx=2048)
    assert p.placement() == "cuda:0=0-27" and p.output_device == "cuda:0" and p.embeddings_device == "cpu"


def test_needs_cpu_offload():
    p = plan(cfg("glm-4-9b-chat"), {"cuda:0": 4 * GiB, "cpu": 16 * GiB}, ctx=8192)
    gpu, cpu_ = len(p.blocks["cuda:0"]), len(p.blocks["cpu"])
    assert gpu > 0 and cpu_ > 0 and gpu + cpu_ == 40
    assert p.blocks["cuda:0"] == list(range(gpu))  # contiguous, GPU first
    assert p.bytes["cuda:0"] <= 4 * GiB
    assert p.placement() == f"cuda:0=0-{gpu - 1},cpu={gpu}-39"


def test_mapped_embeddings_do_not_count_against_the_cpu():
    """GLM-4-9B INT4 on a 2.5 GiB GPU + 4 GiB of CPU: the 1.16 GiB fp16 table is looked up in the file,
    so the CPU budget holds blocks instead; ChatGLM-6B's tied head reads the whole table, so it stays resident."""
    budgets = {"cuda:0": 5 * GiB // 2, "cpu": 4 * GiB}
    with pytest.raises(ValueError, match="does not fit"):
        plan(cfg("glm-4-9b-chat"), budgets, ctx=2048)
    p = plan(cfg("glm-4-9b-chat"), budgets, ctx=2048, mapped_embeddings=True)
    assert sum(map(len, p.blocks.values())) == 40 and any("mapped checkpoint file" in n for n in p.notes)
    tied = cfg("chatglm-6b")
    a = plan(tied, {"cpu": 16 * GiB}, ctx=2048)
    b = plan(tied, {"cpu": 16 * GiB}, ctx=2048, mapped_embeddings=True)
    assert a.bytes == b.bytes and not b.notes


def test_the_output_layer_as_each_device_holds_it():
    """A quantized checkpoint's float head becomes int8 at load on the CPU only; on a GPU it stays bf16 (twice the
    bytes), unless the checkpoint quantized it (--quantize-head), which the plan then reads from its config."""
    from lowvram.memory import footprint
    from lowvram.placement import head_bits_at_load

    c = cfg("glm-4-9b-chat")
    gpu, cpu = {"cuda:0": 16 * GiB, "cpu": 16 * GiB}, {"cpu": 32 * GiB}
    head_bf16, head_int8 = footprint(c, 4, 128, None).output, footprint(c, 4, 128, 8).output
    assert head_bf16 == 2 * c.vocab_size * c.hidden_size and head_int8 < head_bf16 * 0.51
    assert (plan(c, gpu, ctx=2048).bytes["cuda:0"] - plan(c, gpu, ctx=2048, head_bits=8).bytes["cuda:0"]
            == head_bf16 - head_int8)
    assert plan(c, cpu, ctx=2048).bytes == plan(c, cpu, ctx=2048, head_bits=8).bytes
    assert head_bits_at_load(c, None, "cpu") is None  # an unquantized model keeps its float head everywhere
    c.quantization = {"bits": 4, "group_size": 128, "dynamic": {r"+:transformer\.output_layer": {"bits": 8}}}
    assert head_bits_at_load(c, 4, "cuda:0") == 8 and head_bits_at_load(c, 4, "mps") == 8


def test_a_macs_gpu_and_cpu_budgets_share_one_ram(monkeypatch):
    """Detected budgets on unified memory: the MPS share and the CPU's together stay within 3/4 of the RAM."""
    import os

    from lowvram import placement

    ram = 16 * GiB
    monkeypatch.setattr(os, "sysconf", lambda k: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": ram // 4096}[k])
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: ram * 2 // 3, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    b = placement.detect_budgets()
    assert b["mps"] == ram * 2 // 3 and b["mps"] + b["cpu"] <= ram * 3 // 4 and b["cpu"] > 0


def test_needs_two_gpus():
    p = plan(cfg("glm-4-9b-chat"), {"cuda:0": 4 * GiB, "cuda:1": 4 * GiB, "cpu": 16 * GiB}, ctx=2048)
    assert p.blocks["cuda:0"] and p.blocks["cuda:1"] and not p.blocks["cpu"]
    assert p.blocks["cuda:1"][0] == p.blocks["cuda:0"][-1] + 1


def test_cannot_fit_says_what_is_missing():
    with pytest.raises(ValueError, match=r"does not fit: \d+\.\d+ GiB missing.*--ctx 16384.*--max-memory"):
        plan(cfg("glm-4-9b-chat-1m"), {"cpu": 6 * GiB}, ctx=32768)
    with pytest.raises(ValueError, match=r"fewer bits \(--bits 4\)"):
        plan(cfg("glm-4-9b-chat"), {"cpu": 6 * GiB}, ctx=2048, bits=8)


def test_plan_console_script():
    r = subprocess.run([sys.executable, "-m", "lowvram.cli", "plan", "chatglm3-6b", "--max-memory",
                        "cuda:0=3GiB,cpu=16GiB", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["blocks"]["cuda:0"] + d["blocks"]["cpu"] == 28 and d["blocks"]["cpu"] > 0
    assert d["decode_ms_per_token"] > 0


def _plan_error(capsys, *argv) -> str:
    from lowvram.cli import main

    assert main(["plan", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lowvram: error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_plan_refuses_what_cannot_be_made(tiny, capsys):
    """A context below one token, a group size `lowvram quantize` would refuse, a truncated weight file."""
    for bad in ("0", "-5", "8193"):
        assert f"--ctx must be from 1 to the model's context of 8192 tokens, got {bad}" in _plan_error(
            capsys, "chatglm3-6b", "--ctx", bad)
    assert "./nothing-here: no such directory, and not a known model name" in _plan_error(capsys, "./nothing-here")
    err = _plan_error(capsys, "chatglm3-6b", "--group-size", "7")
    assert "--group-size 7 does not divide hidden_size 4096" in err and "-1 for one group per row" in err
    assert "--group-size must be -1 (one group per row) or a positive" in _plan_error(capsys, "chatglm3-6b",
                                                                                      "--group-size", "0")
    d = tiny("glm-4-9b-chat")
    f = next(d.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert f"{f.name}: cannot read" in _plan_error(capsys, str(d), "--max-memory", "cpu=8GiB")


def test_plan_names_the_generation_as_info_does(capsys):
    """The GLM-4-format example's config alone reads as ChatGLM2; its tokenizer says GLM-4, in plan as in info."""
    from conftest import need_example
    from lowvram.cli import main
    from lowvram.info import describe

    d = need_example()
    assert main(["plan", str(d), "--max-memory", "cpu=8GiB", "--group-size", "-1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["generation"] == describe(d)["generation"] == "glm-4-9b-chat"


def test_plan_takes_a_quantized_checkpoints_own_bits(tmp_path, capsys):
    """An fp16 checkpoint plans what `lowvram quantize` makes of it (4-bit, group 128); a quantized one its own."""
    from conftest import need_example
    from lowvram.cli import main
    from lowvram.converters.quantize import quantize

    d = need_example()
    assert main(["plan", str(d), "--max-memory", "cpu=8GiB", "--json"]) == 0
    fp16 = json.loads(capsys.readouterr().out)
    assert (fp16["bits"], fp16["group_size"]) == (4, 128)
    q = quantize(d, tmp_path / "q8", bits=8, group_size=32, progress=False)["out"]
    assert main(["plan", str(q), "--max-memory", "cpu=8GiB", "--json"]) == 0
    own = json.loads(capsys.readouterr().out)
    assert (own["bits"], own["group_size"]) == (8, 32) and own["bytes"]["cpu"] > fp16["bytes"]["cpu"]
    assert main(["plan", str(q), "--max-memory", "cpu=8GiB", "--json", "--bits", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["bits"] == 16


@pytest.mark.parametrize("gen", ["chatglm-6b", "chatglm3-6b", "glm-4-0414"])
def test_split_across_targets_equals_one_device(gen, tiny):
    d = tiny(gen, num_layers=4) if gen != "glm-4-0414" else tiny(gen, num_hidden_layers=4)
    ids = [9, 4, 30, 151, 152] if gen == "chatglm-6b" else [9, 4, 30, 17]
    one = lowvram.load(d, dtype="float32")
    split = lowvram.load(d, dtype="float32", placement="cpu:0=0-1,cpu:1=2-3")
    assert torch.equal(split.logits(ids), one.logits(ids))
    assert split.generate(ids, max_new_tokens=5, stop_token_ids=[]) == one.generate(ids, max_new_tokens=5,
                                                                                     stop_token_ids=[])
    with pytest.raises(ValueError, match="no device for layers"):
        lowvram.load(d, placement="cpu:0=0-1")


def test_load_with_a_budget_applies_the_plan(tiny):
    d = tiny("chatglm3-6b")
    m = lowvram.load(d, dtype="float32", max_memory={"cpu": 4 * GiB}, ctx=64)
    assert all(m.net.layer_device(i).type == "cpu" for i in range(2))
    assert m.generate([3, 4], max_new_tokens=2, stop_token_ids=[]) == lowvram.load(d, dtype="float32").generate(
        [3, 4], max_new_tokens=2, stop_token_ids=[])
    with pytest.raises(ValueError, match="does not fit"):
        lowvram.load(d, max_memory={"cpu": 1 << 20})


def test_loader_puts_tensors_where_the_planner_counts_them():
    """Blocks on their devices, final norm + output layer with the first (fastest) device, the word
    embeddings on the CPU; a tied table (ChatGLM-6B) is the output layer, so it goes with the head."""
    import torch

    from lowvram.loading import _target_device

    devs = [torch.device("cuda:0")] * 2 + [torch.device("cpu")] * 2
    where = {n: _target_device(n, devs, devs[0], tied=False).type
             for n in ("layers.0.mlp.up.weight", "layers.3.attn_norm.weight", "norm.weight", "output.weight",
                       "embed.weight")}
    assert where == {"layers.0.mlp.up.weight": "cuda", "layers.3.attn_norm.weight": "cpu", "norm.weight": "cuda",
                     "output.weight": "cuda", "embed.weight": "cpu"}
    assert _target_device("embed.weight", devs, devs[0], tied=True).type == "cuda"
    p = plan(cfg("chatglm-6b"), {"cuda:0": 2 * GiB, "cpu": 16 * GiB}, ctx=2048)
    assert p.embeddings_device == p.output_device == "cuda:0"


def test_streaming_plan_puts_what_does_not_fit_through_the_gpu():
    p = plan(cfg("glm-4-9b-chat"), {"cuda:0": 3 * GiB, "cpu": 16 * GiB}, ctx=2048, stream=True)
    st = p.blocks["stream:cuda:0"]
    assert st and st[0] == p.blocks["cuda:0"][-1] + 1  # contiguous after the resident ones
    assert p.placement().startswith(f"cuda:0=0-{st[0] - 1},stream:cuda:0={st[0]}-")
    modes = p.as_dict()["modes"]
    assert modes["0"] == "resident" and modes[str(st[0])] == "streamed" and len(modes) == 40
    assert any("streamed" in n for n in p.notes)
    # without a GPU there is nothing to stream through
    assert "stream:cpu" not in plan(cfg("chatglm3-6b"), {"cpu": 16 * GiB}, stream=True).blocks


@pytest.mark.parametrize("quantized", [False, True])
def test_streamed_blocks_compute_what_resident_ones_do(quantized, tiny, tmp_path):
    """Streaming mechanics on the CPU (no GPU here: the copies are CPU to CPU, no side stream): a block whose
    weights live in host copies gives the same logits and tokens as a resident one, and its weights are the
    host copies again after each forward."""
    import torch

    import lowvram
    from lowvram.converters.quantize import quantize
    from lowvram.streaming import StreamedBlock

    src = tiny("chatglm3-6b", hidden_size=128, ffn_hidden_size=256)
    if quantized:
        quantize(src, tmp_path / "q", bits=4, group_size=32, progress=False)
        src = tmp_path / "q"
    ids = list(range(3, 30))
    ref = lowvram.load(src, dtype="float32")
    m = lowvram.load(src, dtype="float32", placement="cpu=0-0,stream:cpu=1-1")
    sb = m.net.layers[1]
    assert isinstance(sb, StreamedBlock) and m.report["streamed_layers"] == [1] and sb.next is sb  # next token's
    assert torch.equal(m.logits(ids), ref.logits(ids))
    assert m.generate(ids, max_new_tokens=6) == ref.generate(ids, max_new_tokens=6)
    assert sb.block.attn_norm.weight is sb.host[[k for _, k in sb.slots].index("weight")]
    if quantized and lowvram.kernels.native.fast():  # bf16 on the CPU: the native kernel holds raw pointers
        with pytest.raises(ValueError, match="cannot stream a block computed by .*native"):
            lowvram.load(src, placement="cpu=0-0,stream:cpu=1-1")
    if quantized:
        from lowvram.bench import graphed_step

        with pytest.raises(ValueError, match=r"--cuda-graph needs every block resident on the GPU \(not --stream\)"):
            graphed_step(m, m.new_cache(8), 0)  # a streamed block's copies and events cannot be captured
        if importlib.util.find_spec("bitsandbytes"):  # Params4bit lose their quant_state when copied out and in
            with pytest.raises(ValueError, match="cannot stream a block computed by .*bnb"):
                lowvram.load(src, backend="bnb", dtype="bfloat16", placement="cpu=0-0,stream:cpu=1-1")
            with pytest.raises(ValueError, match="--cuda-graph does not capture the bnb backend"):
                graphed_step(lowvram.load(src, backend="bnb", dtype="bfloat16"), None, 0)


def test_streamed_blocks_prefetch_in_a_ring(tiny):
    """Each streamed block stages the next while it runs, the last the first (for the next token): the same
    tokens as resident blocks; between tokens only the first stays staged."""
    import lowvram

    src = tiny("glm-4-9b-chat", num_layers=4)
    ref = lowvram.load(src, dtype="float32")
    m = lowvram.load(src, dtype="float32", placement="cpu=0-0,stream:cpu=1-3")
    sbs = [m.net.layers[i] for i in (1, 2, 3)]
    assert [b.next for b in sbs] == sbs[1:] + sbs[:1]
    ids = list(range(3, 20))
    assert m.generate(ids, max_new_tokens=5) == ref.generate(ids, max_new_tokens=5)
    assert sum(b._staged is not None for b in sbs) == 1  # the first, staged for the next token
    assert torch.equal(m.logits(ids), ref.logits(ids))


def test_chat_and_bench_take_the_planner_flags(tiny):
    """`lowvram bench --max-memory` plans the placement like `lowvram plan` (a CPU-only budget here)."""
    src = tiny("chatglm3-6b", hidden_size=128, ffn_hidden_size=256)
    r = subprocess.run([sys.executable, "-m", "lowvram.cli", "bench", str(src), "--prompt-len", "8", "--decode-steps",
                        "2", "--max-memory", "cpu=8GiB", "--ctx", "64", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["decode_ms_median"] > 0
    h = subprocess.run([sys.executable, "-m", "lowvram.cli", "chat", "--help"], capture_output=True, text=True).stdout
    assert "--gpu-mem" in h and "--max-memory" in h and "--stream" in h


NO_CUDA = "no CUDA device: GPU+CPU split and streaming through the GPU run only where a GPU is present"


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("placement", ["cuda:0=0-1,cpu=2-3", "cuda:0=0-1,stream:cuda:0=2-3"])
def test_gpu_cpu_split_and_streaming_equal_one_device(placement, tiny):
    """Issue 6 on the GPU machine: blocks on the GPU and the CPU (or streamed through the GPU on its side
    stream) give the logits of one device within fp32 rounding, and the same greedy tokens."""
    d = tiny("chatglm3-6b", num_layers=4)
    ids = [9, 4, 30, 17]
    one = lowvram.load(d, dtype="float32")
    split = lowvram.load(d, dtype="float32", placement=placement)
    assert split.net.layer_device(0).type == "cuda"
    assert torch.allclose(split.logits(ids), one.logits(ids), rtol=1e-4, atol=1e-4)
    assert split.generate(ids, max_new_tokens=5, stop_token_ids=[]) == one.generate(ids, max_new_tokens=5,
                                                                                     stop_token_ids=[])
