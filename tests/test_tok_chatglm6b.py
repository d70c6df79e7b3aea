"""ChatGLM-6B tokenizer on a sentencepiece model trained here with the ChatGLM-6B pieces.

Expected ids follow the documented rules of the original tokenization_chatglm.py, applied
independently here: \\n -> <n>, \\t -> <|tab|>, space runs replaced longest first (80 down to 2)
by <|blank_N|>, then sentencepiece, then [gMASK] <sop> appended.
"""

import io

import pytest

import lowvram
from lowvram.tokenizer import TokenizerError
from tok_files import train_glm1_model


def preprocess(text: str) -> str:
    """The original rule, written the way the original wrote it."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for i in range(80, 1, -1):
        text = text.replace(" " * i, f"<|blank_{i}|>")
    return text


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("chatglm6b")
    train_glm1_model(d / "ice_text.model")
    return d


@pytest.fixture(scope="module")
def sp(files):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(files / "ice_text.model"))


@pytest.fixture(scope="module")
def tok(files):
    return lowvram.load_tokenizer(files)


def test_specials_at_the_end(tok, sp):
    gmask, sop, eop = sp.piece_to_id("[gMASK]"), sp.piece_to_id("<sop>"), sp.piece_to_id("<eop>")
    assert tok.chat_format == "chatglm"
    assert tok.encode_prompt("你好") == sp.encode("你好") + [gmask, sop]
    assert tok.apply_chat_template([{"role": "user", "content": "你好"}]) == sp.encode("你好") + [gmask, sop]
    assert tok.stop_ids == [eop]
    assert tok.decode(tok.encode_prompt("你好") + [eop]) == "你好"


@pytest.mark.parametrize("text", [
    "def main():\n    print('hello world')\t# greeting",
    "a" + " " * 81 + "b" + " " * 85 + "c" + " " * 160 + "d  e   f",
    "line one\n\nline two\t\tx",
])
def test_whitespace_pieces(tok, sp, text):
    ids = tok.encode(text)
    assert ids == sp.encode(preprocess(text))
    assert tok.decode(ids) == text
    if text.startswith("def"):
        assert sp.piece_to_id("<|blank_4|>") in ids and sp.piece_to_id("<|tab|>") in ids
        assert sp.piece_to_id("<n>") in ids


def test_byte_fallback(tok, sp):
    text = "你好👋 ok ∮"
    ids = tok.encode(text)
    assert ids == sp.encode(preprocess(text))
    assert sum(1 for i in ids if sp.is_byte(i)) >= 4  # 👋 and ∮ are not pieces of this model
    assert tok.decode(ids) == text
    dec = tok.stream_decoder()
    deltas = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)


def test_full_width_punctuation_in_chat_replies(tok):
    """The original converts punctuation in its chat replies (process_response), not in tokenizer.decode."""
    assert tok.decode(tok.encode("你好,世界!真的?是:对;"), reply=True) == "你好，世界！真的？是：对；"
    assert tok.decode(tok.encode("你好,世界!")) == "你好,世界!"  # a raw decode (lowvram generate) as it is
    assert tok.decode(tok.encode("hello, world! a:b"), reply=True) == "hello, world! a:b"  # ASCII context stays
    # streaming sees the same text: a trailing comma waits for the next character
    ids = tok.encode("你好,世界,ok,")
    dec = tok.stream_decoder(reply=True)
    deltas = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(deltas) == tok.decode(ids, reply=True) == "你好，世界，ok,"
    dec = tok.stream_decoder()
    assert "".join([dec.push(i) for i in ids] + [dec.flush()]) == "你好,世界,ok,"


def test_round_prompt(tok, sp):
    gmask, sop = sp.piece_to_id("[gMASK]"), sp.piece_to_id("<sop>")
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！我是人工智能助手。"},
            {"role": "user", "content": "晚上睡不着应该怎么办"}]
    text = "[Round 0]\n问：你好\n答：你好！我是人工智能助手。\n[Round 1]\n问：晚上睡不着应该怎么办\n答："
    assert tok.apply_chat_template(msgs) == sp.encode(preprocess(text)) + [gmask, sop]
    # (query, response) history pairs from the THUDM API give the same prompt
    from lowvram.chat import _conversation

    assert _conversation("晚上睡不着应该怎么办", [("你好", "你好！我是人工智能助手。")], "user")[0] == msgs


def test_what_the_format_cannot_say(tok):
    with pytest.raises(ValueError, match=r"messages\[0\]: the ChatGLM-6B chat format \(chatglm\) has no system role"):
        tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match=r"messages\[1\]: expected a assistant message"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match=r"messages\[1\]: the conversation must end with a user message"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(ValueError, match="no tool calling"):
        tok.apply_chat_template([{"role": "user", "content": "a"}], tools=[{"type": "function",
                                                                           "function": {"name": "f"}}])
    with pytest.raises(ValueError, match="has no observation role"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])


def test_old_revision_is_refused(tmp_path):
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world 你好"] * 50), model_writer=buf,
                                   vocab_size=30, hard_vocab_limit=False, minloglevel=2, num_threads=1)
    (tmp_path / "ice_text.model").write_bytes(buf.getvalue())
    with pytest.raises(TokenizerError, match=r"ice_text.model: ChatGLM-6B ice_text.model without the pieces"):
        lowvram.load_tokenizer(tmp_path)


def test_image_token_offset_and_config_check(tmp_path, files, sp):
    """Revisions with `num_image_tokens` in tokenizer_config.json number text ids after the image tokens."""
    import json
    import shutil

    d = tmp_path / "offset"
    d.mkdir()
    shutil.copy(files / "ice_text.model", d / "ice_text.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"num_image_tokens": 1000}))
    tok = lowvram.load_tokenizer(d)
    assert tok.encode_prompt("你好") == [i + 1000 for i in sp.encode("你好")] + \
        [sp.piece_to_id("[gMASK]") + 1000, sp.piece_to_id("<sop>") + 1000]
    assert tok.decode([7] + tok.encode("你好")) == "你好"  # an image token id has no text
    (d / "config.json").write_text(json.dumps({"gmask_token_id": sp.piece_to_id("[gMASK]")}))
    with pytest.raises(TokenizerError, match=r"in config.json \(gmask_token_id\); the tokenizer files and the config"):
        lowvram.load_tokenizer(d)
