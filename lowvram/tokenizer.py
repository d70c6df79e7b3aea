"""Tokenizers of every GLM generation, read from the files that ship with each checkpoint.

No remote code runs: the sentencepiece / tiktoken / tokenizers files are read as data, and the
few rules the original Python tokenizers added on top (ChatGLM-6B's whitespace pieces and
full-width punctuation, the special ids numbered after the vocabulary) are re-stated here.

  ChatGLM-6B         ice_text.model (sentencepiece, specials are pieces)     text + [gMASK] <sop>
  ChatGLM2/3, CodeGeeX2  tokenizer.model (sentencepiece), specials after it  [gMASK] sop + text
  GLM-4 / GLM-4V     tokenizer.model (base64 ranks, tiktoken), 14 specials    [gMASK] <sop> + text
  glm / glm4 (HF)    tokenizer.json (the `tokenizers` package)                [gMASK] <sop> + text

Chat formats (the prompt layout) live in `lowvram.chat`; `Tokenizer.apply_chat_template`
delegates there.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

CHAT_FORMATS = ("chatglm", "chatglm2", "chatglm3", "glm4")

# Default for a ChatGLM2-architecture checkpoint whose files do not say 2 or 3 (same config, same
# tokenizer.model): ChatGLM3 is the more common release; pass chat_format="chatglm2" to override.
DEFAULT_CHATGLM2_FAMILY_FORMAT = "chatglm3"

GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GLM4_SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                 "<|begin_of_video|>", "<|end_of_video|>")
GLM2_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
GLM3_ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
GLM1_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")


class TokenizerNotFound(FileNotFoundError):
    """The directory holds no tokenizer files (the model then loads without a tokenizer)."""


class TokenizerError(ValueError):
    """Tokenizer files that exist but cannot be read, or contradict each other."""


# ---- incremental decoding --------------------------------------------------------------------


class StreamDecoder:
    """Text deltas of a growing id sequence that never split a UTF-8 character.

    Decodes a short window (the last emitted token and the new ones) rather than the whole
    sequence; a delta is released only when the window no longer ends in U+FFFD (an incomplete
    multi-byte character) and, where the tokenizer post-processes text, when the tail can no
    longer change (`Tokenizer._unstable_tail`).
    """

    def __init__(self, tok: "Tokenizer", skip_special_tokens: bool = True, reply: bool = False):
        self.tok = tok
        self.skip = skip_special_tokens
        self.reply = reply  # a chat answer: post-processed as decode(reply=True)
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids before this were released
        self.held = ""  # released by the window but held back by the post-processing rule
        self.last = ""  # last character handed out (context for post-processing)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prev = self.tok._decode_raw(self.ids[self.prefix:self.read], self.skip)
        new = self.tok._decode_raw(self.ids[self.prefix:], self.skip)
        if new.endswith("\ufffd") or len(new) <= len(prev):
            return ""  # an incomplete character, or a token with no text of its own (yet)
        self.prefix, self.read = self.read, len(self.ids)
        return self._release(new[len(prev):], final=False)

    def flush(self) -> str:
        """Whatever is still held; an invalid byte sequence at the end comes out as U+FFFD, as in decode()."""
        prev = self.tok._decode_raw(self.ids[self.prefix:self.read], self.skip)
        new = self.tok._decode_raw(self.ids[self.prefix:], self.skip)
        out = self._release(new[len(prev):] if len(new) > len(prev) else "", final=True)
        self.ids, self.prefix, self.read = [], 0, 0
        return out

    def _release(self, delta: str, final: bool) -> str:
        text = self.held + delta
        keep = 0 if final or not self.reply else self.tok._unstable_tail(text)
        ready, self.held = (text[: len(text) - keep], text[len(text) - keep:]) if keep else (text, "")
        if not ready:
            return ""
        out = self.tok._post(ready, before=self.last, after=self.held[:1]) if self.reply else ready
        self.last = ready[-1]
        return out


# ---- the tokenizer ---------------------------------------------------------------------------


class Tokenizer:
    """One interface over the three backends; subclasses supply the raw encode/decode."""

    chat_format: str
    prefix_ids: list[int]  # ids that open every prompt ([gMASK], sop)
    suffix_ids: list[int]  # ids that close every prompt (ChatGLM-6B: [gMASK], <sop>)
    special_ids: dict[str, int]
    stop_ids: list[int]
    path: Path | None = None

    # subclass hooks
    def _encode_raw(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode_raw(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    # ChatGLM2/3 and GLM-4 answer a question about their training date with a placeholder that their chat code
    # (process_response) fills in
    TRAINING_TIME = ("[[训练时间]]", "2023年")

    def _post(self, text: str, before: str = "", after: str = "") -> str:
        """A chat reply's post-processing (ChatGLM-6B: punctuation, see SentencePieceTokenizer)."""
        return text.replace(*self.TRAINING_TIME)

    def _unstable_tail(self, text: str) -> int:
        """How many trailing characters `_post` may still change once more text arrives: a start of the
        placeholder."""
        ph = self.TRAINING_TIME[0]
        return next((k for k in range(min(len(ph) - 1, len(text)), 0, -1) if ph.startswith(text[-k:])), 0)

    # public API
    def encode(self, text: str) -> list[int]:
        """Ids of plain text; no special tokens are added (ChatGLM-6B: its whitespace pieces are used)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        return self._encode_raw(text) if text else []

    def decode(self, ids, skip_special_tokens: bool = True, reply: bool = False) -> str:
        """reply: text of a chat answer, which the originals post-process (ChatGLM-6B's full-width punctuation
        next to CJK, in its process_response); a raw decode, as their tokenizers' decode, is left as it is."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        text = self._decode_raw(ids, skip_special_tokens)
        return self._post(text) if reply else text

    def encode_prompt(self, text: str) -> list[int]:
        """A raw (non-chat) prompt the way the original tokenizer frames it: prefix + text + suffix."""
        return self.prefix_ids + self.encode(text) + self.suffix_ids

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tools=None) -> list[int]:
        """Prompt ids of an OpenAI-style conversation in this generation's own format."""
        from .chat import render

        return render(self, messages, add_generation_prompt=add_generation_prompt, tools=tools)

    def stream_decoder(self, skip_special_tokens: bool = True, reply: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens, reply)

    def token_id(self, token: str) -> int:
        if token not in self.special_ids:
            raise KeyError(f"{token!r} is not a special token of this {self.chat_format} tokenizer "
                           f"(has: {', '.join(self.special_ids)})")
        return self.special_ids[token]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.chat_format}, vocab={self.vocab_size}, path={self.path})"


class SentencePieceTokenizer(Tokenizer):
    """ChatGLM-6B (ice_text.model) and ChatGLM2/3/CodeGeeX2 (tokenizer.model)."""

    def __init__(self, model_file: str | Path, chat_format: str, id_offset: int = 0):
        import sentencepiece as spm

        self.path = Path(model_file)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(model_file))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with a C++ message
            raise TokenizerError(f"{model_file}: not a sentencepiece model ({e})") from None
        self.chat_format = chat_format
        self.offset = id_offset  # ChatGLM-6B revisions with `num_image_tokens`: text ids start after them
        n = self.sp.GetPieceSize()
        if chat_format == "chatglm":
            missing = [t for t in ("[gMASK]", "<sop>", "<eop>", "<n>") if self.sp.PieceToId(t) == self.sp.unk_id()]
            if missing:
                raise TokenizerError(
                    f"{model_file}: ChatGLM-6B ice_text.model without the pieces {missing}; this is the pre-2023-04 "
                    "revision (icetk, 20000 image tokens) that lowvram does not read - use the current chatglm-6b files")
            names = GLM1_SPECIALS
            self.special_ids = {t: self.sp.PieceToId(t) + id_offset for t in names}
            self.prefix_ids, self.suffix_ids = [], [self.special_ids["[gMASK]"], self.special_ids["<sop>"]]
            self.stop_ids = [self.special_ids["<eop>"]]
            self._blank = re.compile(r"<\|blank_(\d+)\|>")
        else:
            names = GLM2_SPECIALS + (GLM3_ROLES if chat_format == "chatglm3" else ())
            self.special_ids = {t: n + i for i, t in enumerate(names)}
            self.prefix_ids, self.suffix_ids = [self.special_ids["[gMASK]"], self.special_ids["sop"]], []
            eos = self.sp.eos_id() if self.sp.eos_id() >= 0 else 2
            self.stop_ids = [eos] + ([self.special_ids["<|user|>"], self.special_ids["<|observation|>"]]
                                     if chat_format == "chatglm3" else [])
        self._by_id = {i: t for t, i in self.special_ids.items()}
        self.vocab_size = n + (id_offset if chat_format == "chatglm" else len(names))

    # ChatGLM-6B whitespace: \n -> <n>, \t -> <|tab|>, runs of 2-80 spaces -> <|blank_N|>
    @staticmethod
    def _glm1_pre(text: str) -> str:
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        return re.sub(r" {2,80}", lambda m: f"<|blank_{len(m.group())}|>", text)

    def _glm1_undo(self, text: str) -> str:
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        return self._blank.sub(lambda m: " " * int(m.group(1)), text)

    def _encode_raw(self, text: str) -> list[int]:
        if self.chat_format == "chatglm":
            text = self._glm1_pre(text)
        ids = self.sp.EncodeAsIds(text)
        return [i + self.offset for i in ids] if self.offset else ids

    def _decode_raw(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        n = self.sp.GetPieceSize()
        out, run = [], []
        for i in ids:
            special = self._by_id.get(i)
            i -= self.offset
            if special is None and 0 <= i < n and not self.sp.IsControl(i):
                run.append(i)
                continue
            if special is None and -self.offset <= i < 0:
                continue  # a ChatGLM-6B image token: no text
            if run:
                out.append(self.sp.DecodeIds(run))
                run = []
            if special is not None and not skip_special_tokens:
                out.append(special)
            # other ids (control pieces, the padding rows of the embedding) have no text
        if run:
            out.append(self.sp.DecodeIds(run))
        text = "".join(out)
        return self._glm1_undo(text) if self.chat_format == "chatglm" else text

    # ChatGLM-6B turns ASCII punctuation next to a CJK character full-width (its process_response)
    _PUNCT = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}

    def _post(self, text: str, before: str = "", after: str = "") -> str:
        if self.chat_format != "chatglm":
            return super()._post(text, before, after)
        if not any(p in text for p in self._PUNCT):
            return text
        s = before + text + after
        cjk = lambda c: "\u4e00" <= c <= "\u9fff"  # noqa: E731
        chars = list(s)
        for i, c in enumerate(s):
            if c in self._PUNCT and ((i > 0 and cjk(s[i - 1])) or (i + 1 < len(s) and cjk(s[i + 1]))):
                chars[i] = self._PUNCT[c]
        return "".join(chars)[len(before): len(s) - len(after)]

    def _unstable_tail(self, text: str) -> int:
        if self.chat_format != "chatglm":
            return super()._unstable_tail(text)
        return 1 if text[-1:] in self._PUNCT else 0


class TiktokenTokenizer(Tokenizer):
    """GLM-4 / GLM-4V: `tokenizer.model` is lines of `base64(token) rank`, BPE with the GLM-4 split."""

    def __init__(self, model_file: str | Path, added: dict[str, int] | None = None):
        import tiktoken

        self.path = Path(model_file)
        ranks = read_tiktoken_ranks(model_file)
        n = len(ranks)
        specials = {t: n + i for i, t in enumerate(GLM4_SPECIALS)}
        for tok, i in (added or {}).items():  # tokenizer_config.json added_tokens_decoder is authoritative
            specials[tok] = i
        self.enc = tiktoken.Encoding(name=f"glm4-{self.path.parent.name}", pat_str=GLM4_PATTERN,
                                     mergeable_ranks=ranks, special_tokens=specials)
        self.chat_format = "glm4"
        self.special_ids = specials
        self._by_id = {i: t for t, i in specials.items()}
        self.prefix_ids, self.suffix_ids = [specials["[gMASK]"], specials["<sop>"]], []
        self.stop_ids = [specials["<|endoftext|>"], specials["<|user|>"], specials["<|observation|>"]]
        self.vocab_size = max(n, max(specials.values()) + 1)
        self._n = n

    def _encode_raw(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def _decode_raw(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out, data = [], bytearray()
        for i in ids:
            special = self._by_id.get(i)
            if special is None:
                try:
                    data += self.enc.decode_single_token_bytes(i)
                except KeyError:
                    pass  # ids past the ranks (the embedding's padding rows) have no text
                continue
            if not skip_special_tokens:
                out.append(data.decode("utf-8", errors="replace"))
                out.append(special)
                data = bytearray()
        out.append(data.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer(Tokenizer):
    """`glm` / `glm4` (transformers-native) checkpoints: tokenizer.json through the `tokenizers` package."""

    def __init__(self, json_file: str | Path, eos_ids: list[int]):
        try:
            from tokenizers import Tokenizer as _T
        except ImportError:
            raise TokenizerError(f"{json_file}: reading tokenizer.json needs the 'tokenizers' package "
                                 "(pip install tokenizers)") from None
        self.path = Path(json_file)
        try:
            self.tk = _T.from_file(str(json_file))
        except Exception as e:
            raise TokenizerError(f"{json_file}: not a readable tokenizer.json ({e})") from None
        self.chat_format = "glm4"
        self.template: str | None = None  # the checkpoint's chat template, rendered instead of chat.py's format
        added = {t.content: i for i, t in self.tk.get_added_tokens_decoder().items()}
        self.special_ids = {t: added[t] for t in GLM4_SPECIALS if t in added}
        for t in ("[gMASK]", "<sop>", "<|user|>", "<|assistant|>"):
            if t not in self.special_ids:
                raise TokenizerError(f"{json_file}: the special token {t} is not declared; not a GLM-4 tokenizer")
        self.prefix_ids, self.suffix_ids = [self.special_ids["[gMASK]"], self.special_ids["<sop>"]], []
        stops = list(eos_ids) or [self.special_ids[t] for t in ("<|endoftext|>", "<|user|>", "<|observation|>")
                                   if t in self.special_ids]
        self.stop_ids = stops
        self._special_set = set(added.values())
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)

    def _encode_raw(self, text: str) -> list[int]:
        # The added-token matcher would turn "<|user|>" typed by a user into the role token: encode
        # such strings in two halves so they stay text.
        specials = [t for t in self.special_ids if t in text]
        if not specials:
            return self.tk.encode(text, add_special_tokens=False).ids
        out: list[int] = []
        for piece in re.split("(" + "|".join(re.escape(t) for t in specials) + ")", text):
            if piece in self.special_ids:
                out += self.tk.encode(piece[:1], add_special_tokens=False).ids
                out += self.tk.encode(piece[1:], add_special_tokens=False).ids
            elif piece:
                out += self.tk.encode(piece, add_special_tokens=False).ids
        return out

    def encode_template(self, text: str) -> list[int]:
        """A rendered chat template: its special tokens are tokens (as transformers encodes it)."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def _decode_raw(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        ids = [i for i in ids if 0 <= i < self.vocab_size and not (skip_special_tokens and i in self._special_set)]
        return self.tk.decode(ids, skip_special_tokens=False)


# ---- files and detection ---------------------------------------------------------------------


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            try:
                tok, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
                if len(parts) != 2:
                    raise ValueError
            except (ValueError, IndexError):
                raise TokenizerError(f"{path}:{n}: expected 'base64(token) rank', got {line[:60]!r}") from None
            ranks[tok] = rank
    if not ranks:
        raise TokenizerError(f"{path}: empty tiktoken rank file")
    return ranks


def _is_tiktoken_file(path: Path) -> bool:
    """GLM-4 tokenizer.model is text (`base64 rank` lines); ChatGLM2/3's is a sentencepiece protobuf."""
    with open(path, "rb") as f:
        head = f.read(4096)
    first = head.split(b"\n", 1)[0].split()
    if len(first) != 2 or not first[1].isdigit():
        return False
    try:
        base64.b64decode(first[0], validate=True)
    except ValueError:
        return False
    return True


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def detect_chatglm2_family(directory: Path, raw_config: dict, tok_config: dict) -> tuple[str, str]:
    """ChatGLM2 vs ChatGLM3 from the checkpoint's own metadata: (format, reason)."""
    names = [str(raw_config.get("_name_or_path") or ""), str(tok_config.get("name_or_path") or ""),
             str(tok_config.get("_name_or_path") or ""), directory.resolve().name]
    for name in names:
        low = name.lower()
        if "chatglm3" in low:
            return "chatglm3", f"name {name!r}"
        if "chatglm2" in low or "codegeex2" in low:
            return "chatglm2", f"name {name!r}"
    texts = {"tokenizer_config.json": json.dumps(tok_config, ensure_ascii=False)}
    for fname in ("tokenization_chatglm.py", "special_tokens_map.json", "tokenizer.json"):
        p = directory / fname
        if p.exists() and p.stat().st_size < 5_000_000:
            texts[fname] = p.read_text(encoding="utf-8", errors="replace")
    for fname, text in texts.items():
        if "<|observation|>" in text or "<|assistant|>" in text:
            return "chatglm3", f"{fname} declares the role tokens"
    if tok_config.get("chat_template"):
        return "chatglm3", "tokenizer_config.json has a chat_template"
    if "[Round {}]\\n\\n问" in texts.get("tokenization_chatglm.py", "") or \
            "[Round {}]\n\n问" in texts.get("tokenization_chatglm.py", ""):
        return "chatglm2", "tokenization_chatglm.py builds [Round] prompts"
    return DEFAULT_CHATGLM2_FAMILY_FORMAT, "undecidable from the files (default; override with chat_format=)"


def load_tokenizer(path: str | Path, chat_format: str | None = None, config=None) -> Tokenizer:
    """The tokenizer of a checkpoint directory (or a tokenizer file); `config` is a GLMConfig if known."""
    p = Path(path)
    directory = p if p.is_dir() else p.parent
    if not directory.exists():
        raise TokenizerNotFound(f"{directory}: no such directory")
    if chat_format is not None and chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat_format={chat_format!r}: expected one of {', '.join(CHAT_FORMATS)}")
    raw = getattr(config, "raw", None) or _read_json(directory / "config.json")
    tok_config = _read_json(directory / "tokenizer_config.json")
    files = {f: directory / f for f in ("ice_text.model", "tokenizer.model", "tokenizer.json")}
    if p.is_file():
        kind = "tokenizer.json" if p.suffix == ".json" else "ice_text.model" if p.name == "ice_text.model" \
            else "tokenizer.model"
        files = {kind: p}
    have = {k: v for k, v in files.items() if v.exists()}
    if not have:
        raise TokenizerNotFound(f"{directory}: no tokenizer files (ice_text.model, tokenizer.model or tokenizer.json)")

    def check(allowed: tuple[str, ...], what: str):
        if chat_format is not None and chat_format not in allowed:
            raise ValueError(f"chat_format={chat_format!r} does not fit the {what} tokenizer in {directory} "
                             f"(it speaks {' or '.join(allowed)})")

    if "ice_text.model" in have:
        check(("chatglm",), "ChatGLM-6B")
        offset = int(tok_config.get("num_image_tokens") or 0)
        tok: Tokenizer = SentencePieceTokenizer(have["ice_text.model"], "chatglm", id_offset=offset)
        gmask = raw.get("gmask_token_id")
        if gmask is not None and int(gmask) != tok.special_ids["[gMASK]"]:
            raise TokenizerError(
                f"{have['ice_text.model']}: [gMASK] is id {tok.special_ids['[gMASK]']} in the tokenizer "
                f"(num_image_tokens={offset} in tokenizer_config.json) but {gmask} in config.json (gmask_token_id); "
                "the tokenizer files and the config come from different revisions")
    elif "tokenizer.model" in have and _is_tiktoken_file(have["tokenizer.model"]):
        check(("glm4",), "GLM-4 (tiktoken)")
        added = {}
        for i, entry in (tok_config.get("added_tokens_decoder") or {}).items():
            content = entry.get("content") if isinstance(entry, dict) else None
            if content:
                added[content] = int(i)
        tok = TiktokenTokenizer(have["tokenizer.model"], added)
    elif "tokenizer.model" in have:
        if chat_format is not None:
            check(("chatglm2", "chatglm3"), "ChatGLM2/3 (sentencepiece)")
            fmt, reason = chat_format, "chat_format="
        else:
            fmt, reason = detect_chatglm2_family(directory, raw, tok_config)
        tok = SentencePieceTokenizer(have["tokenizer.model"], fmt)
        tok.format_reason = reason
    else:
        check(("glm4",), "GLM-4 (tokenizer.json)")
        eos = raw.get("eos_token_id")
        eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]
        gen = _read_json(directory / "generation_config.json").get("eos_token_id")
        if gen is not None:
            eos_ids = [int(e) for e in (gen if isinstance(gen, list) else [gen])]
        tok = HFTokenizer(have["tokenizer.json"], eos_ids)
        if chat_format is None:  # the checkpoint's own template, unless a format was asked for
            tok.template = chat_template(directory, tok_config)
    tok.format_reason = getattr(tok, "format_reason", "tokenizer files")
    return tok


def chat_template(directory: Path, tok_config: dict) -> str | None:
    """A transformers-format checkpoint's own chat template (chat_template.jinja, or tokenizer_config.json's):
    the GLM-4-0414 family's prompts differ from glm-4-9b-chat's (system messages first, empty turns kept,
    GLM-Z1's "<think>" after the assistant token), and each model was trained on its own."""
    f = directory / "chat_template.jinja"
    if f.exists():
        return f.read_text(encoding="utf-8")
    t = tok_config.get("chat_template")
    if isinstance(t, list):  # named templates: the default one
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    return t if isinstance(t, str) and t.strip() else None


def generation_for(tok: Tokenizer, current: str) -> str:
    """The generation a ChatGLM2-architecture config really is, once the tokenizer has decided 2 vs 3."""
    if tok.chat_format == "chatglm3" and current == "chatglm2-6b":
        return "chatglm3-6b"
    if tok.chat_format == "glm4" and current == "chatglm2-6b":
        return "glm-4-9b-chat"  # a small GLM-4-format model (the vocabulary size made config.py guess 2)
    return current


def generation_of(path, cfg) -> str:
    """cfg.generation corrected by the tokenizer files beside the checkpoint, when there are any (ChatGLM2 vs 3
    vs a small GLM-4-format model share one config.json), for reports that do not load a tokenizer otherwise."""
    try:
        tok = load_tokenizer(path, config=cfg)
    except Exception:  # no tokenizer files, or ones we cannot read: the config's guess stands
        return cfg.generation
    return generation_for(tok, cfg.generation)
