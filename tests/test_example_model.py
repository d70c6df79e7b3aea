"""The model that ships in examples/: a real GLM-4 checkpoint that produces recognizable text."""

import math
from collections import Counter

import pytest
import torch

import lowvram
from conftest import EXAMPLE as MODEL, need_example

EX = MODEL.parent


@pytest.fixture(scope="module")
def model():
    return lowvram.load(need_example(), dtype="float32")


def test_is_a_glm4_checkpoint(model):
    cfg = model.config
    assert cfg.layout == "chatglm" and cfg.norm == "rmsnorm" and cfg.num_kv_heads < cfg.num_heads
    assert model.tokenizer.chat_format == "glm4"
    assert sum(f.stat().st_size for f in MODEL.iterdir()) < 12 * 2**20  # a few MB
    text = "Return a new list containing all items from the iterable."
    assert model.tokenizer.decode(model.tokenizer.encode(text)) == text
    # its 2112-token vocabulary would make config.json alone read as ChatGLM2: the tokenizer files decide,
    # for the loaded model and for `lowvram info`, which does not load the weights
    from lowvram.info import describe

    assert cfg.generation == describe(MODEL)["generation"] == "glm-4-9b-chat"


def test_better_than_unigram_on_heldout(model):
    tok = model.tokenizer
    train = tok.encode((EX / "corpus" / "train.txt").read_text(encoding="utf-8"))
    held = tok.encode((EX / "corpus" / "heldout.txt").read_text(encoding="utf-8"))[:1024]
    counts = Counter(train)
    total = len(train) + model.config.vocab_size
    unigram = math.exp(-sum(math.log((counts[t] + 1) / total) for t in held[1:]) / (len(held) - 1))
    nll = 0.0
    for s in range(0, len(held) - 1, 128):  # the model was trained on 128-token windows
        chunk = held[s : s + 129]
        nll += torch.nn.functional.cross_entropy(model.logits(chunk[:-1]), torch.tensor(chunk[1:]), reduction="sum").item()
    ppl = math.exp(nll / (len(held) - 1))
    assert ppl < unigram / 3, (ppl, unigram)


def test_answers_in_words_of_its_corpus(model):
    words = set((EX / "corpus" / "train.txt").read_text(encoding="utf-8").split())
    reply, history = model.chat("What is json.dumps?", do_sample=False, max_new_tokens=40)
    got = reply.split()
    assert got and sum(w in words for w in got) / len(got) > 0.6, reply
    assert history[-1]["role"] == "assistant" and history[-1]["content"] == reply
