"""Every way a checkpoint can be broken gets one clear message naming the file or field."""

import json

import pytest

import lowvram
from lowvram.converters.synthetic import TINY, random_state, write_checkpoint


def test_no_config(tmp_path):
    with pytest.raises(lowvram.ConfigError, match=r"config\.json.*no config\.json found"):
        lowvram.load(tmp_path)


def test_bad_json_and_unknown_type(tmp_path):
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(lowvram.ConfigError, match="not valid JSON"):
        lowvram.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(lowvram.ConfigError, match=r"model_type='llama'.*supported: model_type 'chatglm'"):
        lowvram.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm", "num_layers": 2}))
    with pytest.raises(lowvram.ConfigError, match="missing field 'hidden_size'"):
        lowvram.load(tmp_path)


def test_missing_shard(tiny):
    d = tiny("chatglm3-6b", shards=2)
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(lowvram.CheckpointError, match=f"missing: {victim.name}"):
        lowvram.load(d)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_file(tiny, fmt):
    d = tiny("chatglm3-6b", fmt=fmt)
    f = next(d.glob(f"*.{'safetensors' if fmt == 'safetensors' else 'bin'}"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(lowvram.CheckpointError, match=f"{f.name}: cannot read.*truncated or corrupt"):
        lowvram.load(d)


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY["chatglm3-6b"]))
    with pytest.raises(lowvram.CheckpointError, match="no weights found"):
        lowvram.load(tmp_path)


def test_wrong_missing_unexpected_tensors(tmp_path):
    sd = random_state(TINY["chatglm3-6b"])
    sd["transformer.encoder.layers.0.self_attention.dense.weight"] = sd[
        "transformer.encoder.layers.0.self_attention.dense.weight"][:, :10]
    del sd["transformer.encoder.final_layernorm.weight"]
    sd["transformer.something_else.weight"] = sd["transformer.output_layer.weight"]
    d = write_checkpoint(tmp_path / "c", TINY["chatglm3-6b"], sd)
    with pytest.raises(lowvram.CheckpointError) as e:
        lowvram.load(d)
    msg = str(e.value)
    assert "missing 1: transformer.encoder.final_layernorm.weight" in msg
    assert "unexpected 1: transformer.something_else.weight" in msg
    assert "transformer.encoder.layers.0.self_attention.dense.weight (checkpoint (64, 10), expected (64, 64))" in msg
    assert len(msg.splitlines()) == 1


def test_tokenizerless_directory_loads(tiny):
    m = lowvram.load(tiny("glm-4-9b-chat"), dtype="float32")
    assert m.tokenizer is None and m.config.layout == "chatglm"
    assert len(m.generate([1, 2, 3], max_new_tokens=2, stop_token_ids=[])) == 2


def test_unsupported_dtype(tiny):
    """A dtype lowvram does not read (here unsigned 32-bit, the size of the fp32 it replaces) is named with
    its file and tensor at the scan, before any work."""
    import struct

    d = tiny("chatglm3-6b")
    f = next(d.glob("*.safetensors"))
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = "transformer.encoder.final_layernorm.weight"
    assert header[name]["dtype"] == "F32"
    header[name]["dtype"] = "U32"
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))  # same header length: the data offsets stay valid
    assert len(new) == n
    f.write_bytes(raw[:8] + new + raw[8 + n :])
    with pytest.raises(lowvram.CheckpointError, match=f"{f.name}: tensor {name} has dtype U32; lowvram reads F32, F16"):
        lowvram.load(d)


def test_load_arguments_are_checked_up_front(tiny, monkeypatch):
    """Each bad argument of load() is one line naming it, before any weight is read."""
    import torch

    d = tiny("chatglm3-6b")  # 2 blocks
    cases = [(dict(ctx=0), "ctx must be a positive number of tokens"),
             (dict(ctx=5.5), "ctx must be a positive number"),
             (dict(dtype=torch.int8), "dtype torch.int8 not supported"),
             (dict(placement="cpu:0=0-1,cpu:1=1-1"), r"layers \[1\] are given to two targets"),
             (dict(placement="cpu=1-0"), "range 1-0 is reversed"),
             (dict(placement="=0-1"), "expected TARGET=FIRST-LAST"),
             (dict(device="gpu"), "device 'gpu' not understood"),
             (dict(backend="nope"), "backend 'nope' not known; use one of"),
             (dict(dtype="float32", backend="native"), "float32 is the exact reference path"),
             (dict(max_memory="cdua:0=4GiB,cpu=4GiB"), "max_memory: device 'cdua:0' not understood"),
             (dict(max_memory={}), "max_memory must name devices and sizes")]
    if not torch.cuda.is_available():
        cases.append((dict(device="cuda"), "device 'cuda': torch sees no CUDA device"))
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            lowvram.load(d, **kw)
        assert len(str(e.value).splitlines()) == 1, kw
    # sizes as strings in a dict, a backend in capitals, an explicit placement under device="auto"
    m = lowvram.load(d, max_memory={"cpu": "4GiB"}, dtype="float32")
    assert m.generate([1, 2], max_new_tokens=1, stop_token_ids=[])
    assert lowvram.load(d, device="auto", placement="cpu=0-0,cpu:1=1-1", backend="TORCH").net is not None


def test_configs_lowvram_cannot_honour_are_refused(tiny):
    """Rope scaling (yarn/linear), other quantization methods and non-int32 GPTQ words would load and compute
    something else, silently: each is one line naming config.json."""
    d = tiny("glm-4-0414")
    cfg = json.loads((d / "config.json").read_text())
    for extra, msg in (({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope scaling 'yarn' is not supported"),
                       ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling 'linear'"),
                       ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "quant_method 'awq' is not supported"),
                       ({"quantization_config": {"quant_method": "gptq", "bits": 4, "pack_dtype": "int16"}},
                        "GPTQ packed in int16 words is not supported")):
        (d / "config.json").write_text(json.dumps({**cfg, **extra}))
        with pytest.raises(lowvram.ConfigError, match=msg) as e:
            lowvram.load(d)
        assert "config.json" in str(e.value) and len(str(e.value).splitlines()) == 1
