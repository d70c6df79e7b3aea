"""Resident memory: the mapped word-embedding table, and the memory model against measured peak RSS.

RSS is measured in fresh subprocesses (VmRSS / VmHWM from /proc/self/status), so nothing this test
process has allocated or imported counts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowvram
from lowvram.converters.synthetic import write_random

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")

# A GLM-4-shaped model whose cost is mostly its 151552-row vocabulary: the fp16 embedding is 78 MB.
BIG_VOCAB = dict(hidden_size=256, kv_channels=32, num_attention_heads=8, ffn_hidden_size=512,
                 padded_vocab_size=151552)
IDS = [5, 100, 151000, 7, 65000, 3]

PROBE = r"""
import json, sys, torch, lowvram

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

path, out, dtype, ids = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
torch.zeros(1)
with torch.device("meta"):  # the runtime's one-time costs (torch's meta-device machinery) before r0
    torch.nn.Embedding(2, 2), torch.nn.Linear(2, 2)
r0 = status("VmRSS")
m = lowvram.load(path, tokenizer=False, dtype=None if dtype == "default" else dtype)
r1 = status("VmRSS")
torch.save(m.logits(ids), out)
print(json.dumps({"r0": r0, "r1": r1, "r2": status("VmRSS"), "embed": type(m.net.embed).__name__,
                  "mapped": m.report.get("mapped")}))
"""


def _probe(path, out, dtype="default", mmap=True):
    env = dict(os.environ, LOWVRAM_MMAP_EMBEDDINGS="1" if mmap else "0")
    r = subprocess.run([sys.executable, "-c", PROBE, str(path), str(out), dtype, json.dumps(IDS)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory):
    return write_random(tmp_path_factory.mktemp("bigvocab") / "glm4", "glm-4-9b-chat", dtype=torch.float16,
                        **BIG_VOCAB)


@pytest.mark.parametrize("dtype", ["default", "float32"])
def test_mapped_embeddings_stay_out_of_rss_and_change_nothing(big_vocab, tmp_path, dtype):
    emb = 151552 * 256 * (4 if dtype == "float32" else 2)  # the table in the compute dtype
    on = _probe(big_vocab, tmp_path / "on.pt", dtype, mmap=True)
    off = _probe(big_vocab, tmp_path / "off.pt", dtype, mmap=False)
    assert on["embed"] == "FileEmbedding" and on["mapped"] == ["embed.weight"]
    assert off["embed"] == "Embedding" and off["mapped"] == []
    # bit for bit the same logits (fp32: the exact reference path; bf16: rows converted after the lookup)
    assert torch.equal(torch.load(tmp_path / "on.pt"), torch.load(tmp_path / "off.pt"))
    grown_on, grown_off = on["r1"] - on["r0"], off["r1"] - off["r0"]
    assert grown_off - grown_on > 0.8 * emb, (grown_on, grown_off, emb)
    # what loading still adds is the rest of the model: the 151552-row output layer and two small blocks
    rest = 151552 * 256 * (4 if dtype == "float32" else 2) + (8 << 20)
    assert grown_on < rest + 0.1 * emb, (grown_on, rest, emb)
    # a forward over 6 ids touches a few pages of the table, not the table
    assert on["r2"] - on["r1"] < off["r2"] - off["r1"] + 0.3 * emb  # (allocator noise: a few MB)


def test_mapping_only_where_it_pays(tiny):
    ids = [9, 4, 30, 17]
    # ChatGLM-6B's output layer is the embedding table: it is read in full every token, so it is loaded
    m = lowvram.load(tiny("chatglm-6b"), tokenizer=False)
    assert type(m.net.embed).__name__ == "Embedding" and m.report["mapped"] == []
    # .bin checkpoints keep the loaded table; safetensors are mapped, in every layout
    assert lowvram.load(tiny("chatglm3-6b", fmt="bin"), tokenizer=False).report["mapped"] == []
    for gen in ("chatglm3-6b", "glm-4-9b-chat-hf", "glm-4-0414"):
        src = tiny(gen, seed=3, dtype=torch.bfloat16)
        m = lowvram.load(src, tokenizer=False, dtype="float16")
        assert m.report["mapped"] == ["embed.weight"] and m.net.embed.weight.dtype == torch.bfloat16
        assert m.net.embed(torch.tensor([1])).dtype == torch.float16
        os.environ["LOWVRAM_MMAP_EMBEDDINGS"] = "0"
        try:
            ref = lowvram.load(src, tokenizer=False, dtype="float16")
        finally:
            del os.environ["LOWVRAM_MMAP_EMBEDDINGS"]
        assert ref.report["mapped"] == [] and torch.equal(m.logits(ids), ref.logits(ids))


def test_file_rows_read_exactly_the_looked_up_rows(tiny):
    from safetensors.torch import load_file

    from lowvram.checkpoint import Checkpoint

    src = tiny("glm-4-9b-chat", dtype=torch.bfloat16)
    ckpt = Checkpoint(src)
    name = "transformer.embedding.word_embeddings.weight"
    table = load_file(str(src / "model.safetensors"))[name]
    rows = ckpt.file_rows(name)
    assert rows.shape == table.shape and rows.dtype == torch.bfloat16
    ids = torch.tensor([[5, 0, 5], [159, 7, 0]])  # repeats, both ends of the table, a 2-D batch
    assert torch.equal(rows.rows(ids), table[ids])
    with pytest.raises(IndexError, match="160-row"):
        rows.rows(torch.tensor([160]))


def test_file_rows_without_preadv(tiny, monkeypatch):
    """Where os.preadv is missing (Windows), the rows come from a locked seek + read: the same bytes."""
    from safetensors.torch import load_file

    from lowvram.checkpoint import Checkpoint

    src = tiny("chatglm3-6b", dtype=torch.float16)
    name = "transformer.embedding.word_embeddings.weight"
    table = load_file(str(src / "model.safetensors"))[name]
    monkeypatch.delattr("os.preadv", raising=False)
    ids = torch.tensor([3, 150, 3, 0])
    assert torch.equal(Checkpoint(src).file_rows(name).rows(ids), table[ids])


GEN_PROBE = r"""
import json, sys, lowvram
m = lowvram.load(sys.argv[1], tokenizer=False)
m.generate(list(range(3, 3 + int(sys.argv[2]))), max_new_tokens=int(sys.argv[3]))
print(json.dumps({k: int(l.split()[1]) * 1024 for l in open("/proc/self/status")
                  for k in ("VmHWM",) if l.startswith(k + ":")}))
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, big_vocab):
    from lowvram.converters.quantize import quantize

    root = tmp_path_factory.mktemp("rss")
    tiny16 = write_random(root / "tiny16", "chatglm3-6b", dtype=torch.float16)
    out = {"tiny-fp16": tiny16, "vocab151k-fp16": big_vocab}
    out["tiny-int4"] = root / "tiny4"
    quantize(tiny16, out["tiny-int4"], bits=4, group_size=32, progress=False)
    out["vocab151k-int4"] = root / "big4"
    quantize(big_vocab, out["vocab151k-int4"], bits=4, group_size=128, progress=False)
    return out


@pytest.mark.parametrize("which", ["tiny-fp16", "tiny-int4", "vocab151k-fp16", "vocab151k-int4"])
def test_memory_model_predicts_peak_rss_within_10_percent(checkpoints, which):
    from lowvram.memory import predict_rss

    path, prompt, new = checkpoints[which], 48, 8
    r = subprocess.run([sys.executable, "-c", GEN_PROBE, str(path), str(prompt), str(new)],
                       capture_output=True, text=True, timeout=300, env={k: v for k, v in os.environ.items()
                                                                         if k != "LOWVRAM_MMAP_EMBEDDINGS"})
    assert r.returncode == 0, r.stderr
    measured = json.loads(r.stdout.strip().splitlines()[-1])["VmHWM"]
    p = predict_rss(path, prompt_len=prompt, new_tokens=new)
    assert abs(p.peak / measured - 1) < 0.10, (which, p.as_dict(), measured)
    if which.startswith("vocab151k"):  # the table is counted as mapped, not resident
        assert p.mapped == 151552 * 256 * 2 and p.weights < p.mapped + (8 << 20)


def test_memory_model_predicts_bitsandbytes_peak_rss_within_10_percent(tmp_path):
    """The bnb backend: bitsandbytes' libraries and the 16-bit copy each weight is re-quantized from."""
    from lowvram.kernels import BACKENDS
    from lowvram.memory import predict_rss
    import importlib

    why = importlib.import_module(BACKENDS["bnb"]).available()
    if why:
        pytest.skip(f"backend 'bnb' unavailable: {why}")
    from lowvram.converters.quantize import quantize

    path, prompt, new = tmp_path / "q", 48, 8  # widths bitsandbytes' CPU 4-bit kernel takes (multiples of 64)
    quantize(write_random(tmp_path / "src", "chatglm3-6b", hidden_size=128, kv_channels=32, ffn_hidden_size=256),
             path, bits=4, group_size=32, progress=False)
    env = {k: v for k, v in os.environ.items() if k != "LOWVRAM_MMAP_EMBEDDINGS"}
    r = subprocess.run([sys.executable, "-c", GEN_PROBE, str(path), str(prompt), str(new)], capture_output=True,
                       text=True, timeout=300, env=dict(env, LOWVRAM_BACKEND="bnb"))
    assert r.returncode == 0, r.stderr
    measured = json.loads(r.stdout.strip().splitlines()[-1])["VmHWM"]
    p = predict_rss(path, prompt_len=prompt, new_tokens=new, backend="bnb")
    assert abs(p.peak / measured - 1) < 0.10, (p.as_dict(), measured)


HEAP_PROBE = r"""
import resource, sys, lowvram
m = lowvram.load(sys.argv[1], tokenizer=False)
ids = [3 + i % 150 for i in range(512)]
m.logits(ids)  # the first prompt grows the heap
counts = []
for _ in range(2):  # the fewer of two: a stray first-use fault elsewhere in the process is not the heap's
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    m.logits(ids)
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(counts))
"""


@pytest.mark.parametrize("keep", ["1", "0"])
def test_a_second_prompt_reuses_the_heap(keep, tmp_path):
    """After a load, glibc keeps a prompt's freed activations (MiB-sized here: a 16384-wide MLP) in its heap for
    the next one, so a second prompt writes into pages it already has; with LOWVRAM_KEEP_HEAP=0 (glibc's
    defaults) they are mapped afresh and faulted in again (a ChatGLM3-6B prompt: ~690k faults, 2.7 GB)."""
    path = write_random(tmp_path / "m", "chatglm3-6b", hidden_size=256, kv_channels=32, num_attention_heads=8,
                        ffn_hidden_size=8192, num_layers=2, seq_length=1024)
    env = dict(os.environ, LOWVRAM_KEEP_HEAP=keep)
    r = subprocess.run([sys.executable, "-c", HEAP_PROBE, str(path)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    faults = int(r.stdout.split()[-1])
    # measured 148 and ~4000: a quarter of the pages of the MLP's widest output (16 MiB) tells them apart
    quarter = 512 * 2 * 8192 * 2 // 4096 // 4
    assert (faults < quarter) == (keep == "1"), faults
