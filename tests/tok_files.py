"""Tokenizer files in the exact original formats, small enough to reason about by hand.

GLM-4: `tokenizer.model` = lines `base64(token) rank`; here ranks 0..255 are the single bytes in
byte order (rank of byte b is b) followed by GLM4_MERGES, so expected ids can be worked out on
paper with the BPE rule (merge the adjacent pair of lowest rank until none is left).

ChatGLM-6B: `ice_text.model` = a sentencepiece model holding the ChatGLM-6B pieces (<n>, the
eight specials, <|tab|>, <|blank_2|>..<|blank_80|>) and byte fallback, trained here on a few lines.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

GLM4_MERGES = [
    b"he", b"ll", b"llo", b"hello",  # 256..259
    b" w", b"or", b" wor", b"ld", b" world",  # 260..264
    b"\xe4\xbd", b"\xe4\xbd\xa0", b"\xe5\xa5", b"\xe5\xa5\xbd", "你好".encode(),  # 265..269 (你, 好, 你好)
    b"33", b"\n\n",  # 270, 271
]
GLM4_N = 256 + len(GLM4_MERGES)  # first special id


def rank_of(token: bytes) -> int:
    return token[0] if len(token) == 1 else 256 + GLM4_MERGES.index(token)


def write_glm4_tokenizer(directory: Path, added_tokens_decoder: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    ranks = [bytes([i]) for i in range(256)] + GLM4_MERGES
    lines = "".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks))
    (directory / "tokenizer.model").write_text(lines)
    cfg = {"tokenizer_class": "ChatGLM4Tokenizer", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
           "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]}}
    if added_tokens_decoder:
        cfg["added_tokens_decoder"] = added_tokens_decoder
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return directory


GLM1_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
GLM1_WHITESPACE = ["<n>", "<|tab|>"] + [f"<|blank_{i}|>" for i in range(2, 81)]

_CORPUS = [
    "你好，我是人工智能助手。很高兴见到你！",
    "晚上睡不着应该怎么办？可以试试听音乐，或者读一本书。",
    "hello world, this is a small test corpus for the tokenizer.",
    "def main():<n><|blank_4|>print('hello world')<|tab|># greeting",
    "问：你好<n>答：你好！欢迎问我任何问题。",
    "[Round 0]<n>问：你好<n>答：",
]


def train_glm1_model(path: Path, vocab_size: int = 600) -> Path:
    """A sentencepiece model with the ChatGLM-6B pieces (written as `ice_text.model`)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 20), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, byte_fallback=True, user_defined_symbols=GLM1_WHITESPACE[:1] + GLM1_SPECIALS
        + GLM1_WHITESPACE[1:], hard_vocab_limit=False, num_threads=1, minloglevel=2,
        split_by_whitespace=True, remove_extra_whitespaces=False, normalization_rule_name="identity")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path
