"""glm-4-9b-chat-hf (`glm`) and GLM-4-0414 (`glm4`) against transformers' own implementations."""

import pytest
import torch

import lowvram

transformers = pytest.importorskip("transformers", reason="transformers (dev extra) is the reference for glm/glm4")


@pytest.mark.parametrize("kind", ["glm", "glm4"])
@pytest.mark.parametrize("shard", [None, "40KB"])
def test_logits_match_transformers(kind, shard, tmp_path):
    if kind == "glm":
        C, M = transformers.GlmConfig, transformers.GlmForCausalLM
    else:
        C, M = transformers.Glm4Config, transformers.Glm4ForCausalLM
    cfg = C(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5, attention_bias=True,
            partial_rotary_factor=0.5, pad_token_id=0, eos_token_id=[1])
    torch.manual_seed(0)
    ref_model = M(cfg).eval()
    for p in ref_model.parameters():
        p.data.normal_(0, 0.2)
    kw = {"max_shard_size": shard} if shard else {}
    ref_model.save_pretrained(tmp_path, **kw)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 160, (12,))
    with torch.no_grad():
        ref = ref_model(ids[None]).logits[0]
    ours = lowvram.load(tmp_path, dtype="float32")
    assert ours.config.layout == kind
    out = ours.logits(ids)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-4
