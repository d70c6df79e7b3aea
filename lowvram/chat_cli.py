"""`lowvram chat MODEL` and `lowvram generate MODEL`: the terminal front ends of the chat API."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from .model import PromptCache
from .placement import budgets_from_arguments, placement_arguments


def _model_arguments(p):
    p.add_argument("model", help="checkpoint directory (original or quantized)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default=None, help="float32 (exact reference), bfloat16, float16; default per device")
    p.add_argument("--backend", default=None, help="quantized kernel backend: native, ort, cpu, torch, cuda, mps, bnb")
    p.add_argument("--placement", default=None, help='blocks per device, e.g. "cuda:0=0-19,cpu=20-27"')
    placement_arguments(p)
    p.add_argument("--ctx", type=int, default=None, help="context window to allocate (default: the model's)")
    p.add_argument("--kv-int8", action="store_true", help="int8 KV cache: half of bf16's memory, for long contexts")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="generate until --max-new-tokens (benchmarks, tests)")


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
                **({"stop_token_ids": []} if args.ignore_eos else {}))


def _read_bytes() -> int | None:
    """Bytes this process has read so far (Linux); the loader reads checkpoint files with plain reads."""
    try:
        with open("/proc/self/io") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("rchar:"))
    except (OSError, StopIteration, ValueError):
        return None


def _progress(path, done: threading.Event):
    """Redraw one stderr line while loading: share of the weight files read, or seconds elapsed."""
    files = [f for f in Path(path).glob("*") if f.suffix in (".safetensors", ".bin")]
    total, start, t0 = sum(f.stat().st_size for f in files), _read_bytes(), time.time()
    while not done.wait(0.25):
        now = _read_bytes()
        line = f"loading {path} ... {time.time() - t0:.0f}s"
        if total and start is not None and now is not None:
            got = min(now - start, total)
            size = f"{total / 2**30:.1f} GiB" if total >= 2**30 else f"{total / 2**20:.0f} MiB"
            line = f"loading {path} ... {100 * got / total:3.0f}% of {size}, {time.time() - t0:.0f}s"
        sys.stderr.write("\r" + line)
        sys.stderr.flush()


def _check_counts(args):
    """Named as typed, before reading a prompt or the model."""
    for flag, v, least in (("--ctx", args.ctx, 1), ("--max-new-tokens", args.max_new_tokens, 0)):
        if v is not None and v < least:
            raise ValueError(f"{flag} must be >= {least}, got {v}")


def _load(args, chat_format=None):
    """Load with a progress line on a terminal; nothing on stderr when it is piped."""
    import lowvram  # imported before the progress line starts counting bytes read


    tty = sys.stderr.isatty()
    done = threading.Event()
    if tty:
        sys.stderr.write(f"loading {args.model} ...")
        sys.stderr.flush()
        threading.Thread(target=_progress, args=(args.model, done), daemon=True).start()
    t0 = time.time()
    try:
        model = lowvram.load(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                             placement=args.placement, ctx=args.ctx, chat_format=chat_format,
                             max_memory=budgets_from_arguments(args), stream=args.stream)
    finally:
        done.set()
        if tty:
            sys.stderr.write("\r\033[K")
    if tty:
        sys.stderr.write(f"loaded {model.config.generation} from {args.model} in {time.time() - t0:.1f}s "
                         f"({model.dtype}, {model.config.num_layers} layers)\n")
        cache = model.report.get("repack_cache", "")
        if cache.startswith("written to "):  # a few GB of disk the user did not ask for: say where, once
            sys.stderr.write(f"repacked weights {cache}: later loads map them (LOWVRAM_CACHE=0 turns this off)\n")
    if model.tokenizer is None:
        raise ValueError(f"{args.model}: no tokenizer files (tokenizer.model, ice_text.model or tokenizer.json)")
    model.kv_int8 = args.kv_int8
    return model


def chat_arguments(p):
    _model_arguments(p)
    p.add_argument("--system", default=None, help="system prompt (generations that have one)")
    p.add_argument("--chat-format", default=None, help="override: chatglm, chatglm2, chatglm3, glm4")


def _context_full(model, used: int, new: int, max_new: int) -> bool:
    """Whether the context ended the output, which would otherwise look like the model's own end: not
    --max-new-tokens, nor a stop token (that takes a slot but is not counted in `used`)."""
    return used >= model.ctx and new < max_new


HELP = "Type a message. `clear` starts over, `stop` or Ctrl-D exits, Ctrl-C interrupts an answer."


def chat_main(args) -> int:
    _check_counts(args)
    model = _load(args, args.chat_format)
    gen = _sampling(args)
    name = Path(args.model).resolve().name or model.config.generation
    start = [{"role": "system", "content": args.system}] if args.system else []
    if start:  # a generation without a system role: say so now, not at every turn
        model.tokenizer.apply_chat_template(start + [{"role": "user", "content": "hi"}])
    history = list(start)
    cache = PromptCache()  # each turn prefills only what follows the conversation's cached keys and values
    out = sys.stdout
    out.write(f"{HELP}\n")
    while True:
        stream, shown = None, ""
        try:  # Ctrl-C anywhere in a turn ends that turn (keeping what was answered), never the session
            out.write("\nYou: ")
            out.flush()
            line = sys.stdin.readline()
            if not line:  # Ctrl-D
                out.write("\n")
                return 0
            query = line.strip()
            if query in ("stop", "exit", "quit"):
                return 0
            if query == "clear":
                history = list(start)
                cache.clear()
                out.write("(history cleared)\n")
                continue
            if not query:
                continue
            out.write(f"{name}: ")
            out.flush()
            try:
                stream = model.stream_chat(history + [{"role": "user", "content": query}], prompt_cache=cache, **gen)
            except ValueError as e:  # e.g. the conversation no longer fits the context
                out.write(f"\nerror: {e}\n")
                continue
            for delta in stream:
                shown += delta
                out.write(delta)
                out.flush()
            u = stream.usage
            if _context_full(model, u["total_tokens"], u["completion_tokens"], args.max_new_tokens):
                out.write(f" (stopped: the context of {model.ctx} tokens is full; `clear` starts over)")
            out.write("\n")
        except KeyboardInterrupt:
            if stream is not None:  # the partial answer stays in the history
                stream.close()
                out.write((stream.text[len(shown):] if stream.text.startswith(shown) else "") + " [interrupted]")
            out.write("\n")
        if stream is not None:
            history = stream.history


def generate_arguments(p):
    _model_arguments(p)
    p.add_argument("--prompt", default=None, help="text to continue; '-' or omitted: read stdin")
    p.add_argument("--raw", action="store_true", help="do not add the generation's prompt prefix ([gMASK] sop ...)")


def generate_main(args) -> int:
    _check_counts(args)
    prompt = args.prompt
    if prompt in (None, "-"):  # `echo text | lowvram generate`: echo's newline is not part of the prompt
        prompt = sys.stdin.read()
        prompt = prompt[:-1] if prompt.endswith("\n") else prompt
    model = _load(args)
    tok = model.tokenizer
    ids = tok.encode(prompt) if args.raw else tok.encode_prompt(prompt)
    gen = dict({"stop_token_ids": tok.stop_ids}, **_sampling(args))
    dec = tok.stream_decoder()
    n = 0
    try:
        for t in model.stream_generate(ids, **gen):
            n += 1
            sys.stdout.write(dec.push(t))
            sys.stdout.flush()
    except KeyboardInterrupt:
        n = args.max_new_tokens  # interrupted: no notice
    sys.stdout.write(dec.flush() + "\n")
    if _context_full(model, len(ids) + n, n, args.max_new_tokens):  # on stderr: stdout is the continuation only
        sys.stderr.write(f"(stopped: the context of {model.ctx} tokens is full)\n")
    return 0
