"""Train the embedded example model `examples/glm4-tiny` from the committed corpus.

The result is a real GLM-4 checkpoint in the original layout (model_type "chatglm", GLM-4 config
fields, tiktoken `tokenizer.model` of base64 ranks with the 14 GLM-4 specials after them), trained
with lowvram's own model code, so every loader path users hit is exercised by a model that
produces recognizable text. About 10 minutes on 2 cores, seed 0; the step count follows the time
budget (machine speed) unless --steps fixes it.

    python examples/train_tiny.py            # writes examples/glm4-tiny
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowvram.checkpoint import original_name
from lowvram.config import parse_config
from lowvram.converters.synthetic import write_checkpoint
from lowvram.models.glm import GLM

HERE = Path(__file__).parent
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         r"|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
            "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
            "<|end_of_video|>"]


def train_bpe(text: str, n_ranks: int) -> list[bytes]:
    """Byte-level BPE with the GLM-4 split, via the `tokenizers` trainer; ranks = merge order."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.pre_tokenizers import ByteLevel

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
                                                ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    alphabet = ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=n_ranks, initial_alphabet=alphabet, show_progress=False)
    tk.train_from_iterator([text], trainer)
    u2b = {u: b for b, u in _bytes_to_unicode().items()}
    merges = json.loads(tk.to_str())["model"]["merges"]
    tokens = [bytes([b]) for b in range(256)]
    for m in merges:
        a, b = m if isinstance(m, list) else m.split(" ")
        tokens.append(bytes(u2b[c] for c in a) + bytes(u2b[c] for c in b))
    return tokens[:n_ranks]


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def model_config(n_ranks: int, args) -> dict:
    vocab = n_ranks + len(SPECIALS)
    padded = -(-vocab // 64) * 64
    eos = [n_ranks + SPECIALS.index(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    return {
        "_name_or_path": "lowvram/glm4-tiny", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "add_bias_linear": False, "add_qkv_bias": True, "apply_residual_connection_post_layernorm": False,
        "multi_query_attention": True, "multi_query_group_num": 2, "original_rope": True, "post_layer_norm": True,
        "rmsnorm": True, "tie_word_embeddings": False, "layernorm_epsilon": 1.5625e-07, "rope_ratio": 1,
        "hidden_size": args.hidden, "num_attention_heads": args.heads, "kv_channels": args.hidden // args.heads,
        "ffn_hidden_size": args.ffn, "num_layers": args.layers, "padded_vocab_size": padded, "seq_length": 2048,
        "eos_token_id": eos, "pad_token_id": eos[0], "torch_dtype": "float16",
    }


def samples(ids_text: list[int], chat: list[list[int]], seq: int, batch: int, rng: random.Random):
    """Half plain text windows, half chat turns packed into windows."""
    while True:
        rows = []
        for i in range(batch):
            if i % 2 == 0 or not chat:
                s = rng.randrange(0, len(ids_text) - seq - 1)
                rows.append(ids_text[s : s + seq + 1])
            else:
                row: list[int] = []
                while len(row) < seq + 1:
                    row += chat[rng.randrange(len(chat))]
                rows.append(row[: seq + 1])
        yield torch.tensor(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(HERE / "glm4-tiny"))
    ap.add_argument("--ranks", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--steps", type=int, default=None, help="a fixed step count instead of --minutes (exact re-runs)")
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    rng = random.Random(0)

    text = (HERE / "corpus" / "train.txt").read_text(encoding="utf-8")
    pairs = [json.loads(line) for line in (HERE / "corpus" / "chat.jsonl").read_text(encoding="utf-8").splitlines() if line]
    tokens = train_bpe(text, args.ranks)
    n = len(tokens)
    import tiktoken

    enc = tiktoken.Encoding("glm4-tiny", pat_str=SPLIT, mergeable_ranks={t: i for i, t in enumerate(tokens)},
                            special_tokens={s: n + i for i, s in enumerate(SPECIALS)})
    sp = {s: n + i for i, s in enumerate(SPECIALS)}
    ids_text = enc.encode_ordinary(text)
    chat = [[sp["[gMASK]"], sp["<sop>"], sp["<|user|>"]] + enc.encode_ordinary("\n" + p["q"]) + [sp["<|assistant|>"]]
            + enc.encode_ordinary("\n" + p["a"]) + [sp["<|user|>"]] for p in pairs]
    print(f"{n} ranks; {len(ids_text)} text tokens ({len(text) / len(ids_text):.2f} chars/token); {len(chat)} chat turns")

    config = model_config(n, args)
    cfg = parse_config(config)
    net = GLM(cfg)
    for name, p in net.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02 if "embed" in name else 1 / math.sqrt(p.shape[1]))
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.95))
    pos = torch.arange(args.seq)[None]
    held = enc.encode_ordinary((HERE / "corpus" / "heldout.txt").read_text(encoding="utf-8"))
    held = torch.tensor(held[: (len(held) // (args.seq + 1)) * (args.seq + 1)]).view(-1, args.seq + 1)[:32]
    best, best_state = float("inf"), None
    budget = args.minutes * 60
    t0 = time.time()
    step = 0
    for batch in samples(ids_text, chat, args.seq, args.batch, rng):
        frac = step / args.steps if args.steps else (time.time() - t0) / budget
        if frac >= 1:
            break
        lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batch[:, :-1], batch[:, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = net.head(net.hidden(x, pos.expand(x.shape[0], -1)))
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            hl = heldout_loss(net, held, pos)
            if hl < best:  # keep the checkpoint that generalises best: the corpus is small
                best, best_state = hl, {k: v.detach().clone() for k, v in net.state_dict().items()}
            print(f"step {step} loss {loss.item():.3f} held-out {hl:.3f} (ppl {math.exp(hl):.1f}) lr {lr:.2e} "
                  f"{time.time() - t0:.0f}s", flush=True)
        step += 1
    hl = heldout_loss(net, held, pos)
    if hl < best:
        best, best_state = hl, net.state_dict()
    net.load_state_dict(best_state)
    print(f"best held-out loss {best:.3f} (ppl {math.exp(best):.1f})")

    write(Path(args.out), config, net, tokens, cfg)
    print(f"wrote {args.out} after {step} steps")


@torch.no_grad()
def heldout_loss(net, held, pos) -> float:
    x, y = held[:, :-1], held[:, 1:]
    logits = net.head(net.hidden(x, pos.expand(x.shape[0], -1)))
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)).item()


def write(out: Path, config: dict, net: GLM, tokens: list[bytes], cfg):
    sd = {}
    for name, p in net.named_parameters():
        sd[original_name(cfg.layout, name)] = p.detach().to(torch.float16).contiguous()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(tmp, config, sd, fmt="safetensors", dtype=torch.float16)
    n = len(tokens)
    (tmp / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    added = {str(n + i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                          "special": True} for i, s in enumerate(SPECIALS)}
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "ChatGLM4Tokenizer", "added_tokens_decoder": added, "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "model_max_length": 2048, "padding_side": "left", "remove_space": False,
        "do_lower_case": False, "clean_up_tokenization_spaces": False}, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({
        "eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"], "do_sample": True,
        "temperature": 0.8, "top_p": 0.8, "max_length": 2048}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


if __name__ == "__main__":
    main()
