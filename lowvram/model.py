"""The public model object: positions and masks per generation, the KV cache, and generation."""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import GLMConfig
from .generate import Sampling, select
from .models.glm import GLM, Int8KV


_UIDS = itertools.count()


class ContextError(ValueError):
    """The input does not fit the model's context window."""


class PromptCache:
    """One conversation's KV cache, kept between calls: a prompt that extends the last one (a chat's next turn is
    the history, the answer and a new message) prefills only its new tokens, not the whole conversation again.
    Owned by the caller, one per conversation and not shared between threads; pass it as `prompt_cache=` to
    stream_generate / generate / chat. Reuse needs one sequence, a float cache and positions that depend only on
    the index (every generation but ChatGLM-6B, whose positions hinge on where [gMASK] is); otherwise it is ignored.
    The kept keys and values came partly from decode steps, so a reply can differ from a fresh run's by float
    rounding, as in llama.cpp's prompt cache."""

    def __init__(self):
        self.ids: list[int] = []  # the tokens whose keys and values `caches` holds, in order
        self.caches = None
        self.reused = 0  # tokens of the last prompt taken from the cache
        self.model_id = None  # which model filled it: another model's keys are not reused

    def clear(self):
        self.ids, self.caches, self.reused, self.model_id = [], None, 0, None


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Model:
    def __init__(self, net: GLM, config: GLMConfig, path: str | Path | None = None, tokenizer=None,
                 report: dict | None = None, ctx: int | None = None):
        self.net = net
        self.config = config
        self.path = Path(path) if path else None
        self.tokenizer = tokenizer
        self.report = report or {}
        self.uid = next(_UIDS)  # what a PromptCache records: id() of a freed model can come back
        self.dtype = self.report.get("dtype", net.embed.weight.dtype)
        self.ctx = min(int(ctx or config.max_length), config.max_length)
        self.prefill_chunk = 512  # long prompts run in chunks so attention memory stays linear
        self.kv_int8 = False  # True: int8 KV cache (half the memory of bf16) for long contexts
        # Kernels with their own thread pools (ORT's, the native kernel's OpenMP team) run the matmuls of a
        # decode step; torch's small ops (norms, RoPE, attention over the cache) are then faster on one
        # thread than contending for the cores (measured 2-3x less non-matmul time per token on 2 cores).
        self.decode_threads = 1 if any(type(m).__module__.endswith(("kernels.ort", "kernels.native"))
                                       for m in net.modules()) else None

    # ---- positions and masks: the one place that knows each generation's scheme ----------

    def positions(self, ids: list[int], start: int, n: int) -> torch.Tensor:
        """Position ids of tokens start..start+n-1 of a sequence whose prompt is `ids` ([1, n] or [1, 2, n])."""
        cfg = self.config
        idx = torch.arange(start, start + n)
        if cfg.rope != "2d":
            return idx[None]
        ctx_len, mask_pos = self._glm1_prompt(ids)
        if ctx_len is None:  # no <sop>: plain text, plain positions
            return torch.stack([idx, torch.zeros_like(idx)])[None]
        pos = torch.where(idx < ctx_len, idx, torch.full_like(idx, mask_pos))
        block = torch.where(idx < ctx_len, torch.zeros_like(idx), idx - ctx_len + 1)
        return torch.stack([pos, block])[None]

    def _glm1_prompt(self, ids: list[int]) -> tuple[int | None, int]:
        """ChatGLM-6B: the prompt up to <sop> is bidirectional; generated positions stay at [gMASK]."""
        cfg = self.config
        if cfg.sop_token_id not in ids:
            return None, 0
        ctx_len = ids.index(cfg.sop_token_id)
        ctx = ids[:ctx_len]  # the mask token is the prompt's, before <sop>
        mask_id = cfg.gmask_token_id if cfg.gmask_token_id in ctx else cfg.mask_token_id
        mask_pos = ctx.index(mask_id) if mask_id in ctx else ctx_len
        return ctx_len, mask_pos

    def _mask(self, ids: list[int], start: int, n: int) -> torch.Tensor | None:
        """Bool [n, slots] over the cache (prefix slots first), or None for causal over the cache slots (row i
        sees every slot up to its own: the prefix and earlier chunks whole), which the layers run without a mask."""
        pre = self.config.pre_seq_len
        bidir = (self._glm1_prompt(ids)[0] or 0) if self.config.rope == "2d" else 0
        if n == 1 or bidir <= start:
            return None  # one new token, or no bidirectional context ahead of these rows: plain causal
        q = torch.arange(start, start + n)[:, None]
        k = torch.arange(start + n)[None, :]
        m = (k <= q) | (k < bidir)
        return torch.cat([torch.ones(n, pre, dtype=torch.bool), m], dim=1)

    # ---- the forward pass ------------------------------------------------------------------

    def new_cache(self, slots: int, batch: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cfg, net = self.config, self.net
        caches = []
        for i in range(cfg.num_layers):
            shape = (batch, cfg.num_kv_heads, slots, cfg.head_dim)
            dev = net.layer_device(i)
            if self.kv_int8:
                caches.append(Int8KV(shape, self.dtype, dev))
            else:
                caches.append((torch.zeros(shape, dtype=self.dtype, device=dev), torch.zeros(shape, dtype=self.dtype, device=dev)))
        if net.prefix is not None:
            pkv = net.prefix().to(self.dtype)
            P = cfg.pre_seq_len
            for i, c in enumerate(caches):
                k, v = pkv[2 * i][None].to(self.dtype), pkv[2 * i + 1][None].to(self.dtype)
                if isinstance(c, Int8KV):
                    c.write(0, k.to(c.q[0].device), v.to(c.q[0].device))
                else:
                    c[0][:, :, :P] = k.to(c[0].device)
                    c[1][:, :, :P] = v.to(c[1].device)
        return caches

    def forward(self, ids: list[int], start: int, n: int, caches) -> torch.Tensor:
        """Hidden states [n, hidden] of tokens start..start+n-1, written into the cache, in prefill chunks."""
        return self.forward_rows([ids], start, n, caches)[0]

    def forward_rows(self, rows: list[list[int]], start: int, n: int, caches, prompt_len: int | None = None) -> torch.Tensor:
        """[B, n, hidden] for B equal-length sequences in one pass, so a decode step reads the weights once
        for all of them. Positions may differ per row; the attention mask must not (one mask for the batch).
        prompt_len: where the prompt ends in rows that have grown by generated tokens (ChatGLM-6B's positions
        and mask come from the prompt alone: a generated <sop> or [gMASK] changes nothing)."""
        if n == 1 and len(rows) == 1 and self.decode_threads and torch.get_num_threads() != self.decode_threads:
            old = torch.get_num_threads()
            torch.set_num_threads(self.decode_threads)
            try:
                return self.forward_rows(rows, start, n, caches, prompt_len)
            finally:
                torch.set_num_threads(old)
        P = self.config.pre_seq_len
        prompts = [r[:prompt_len] for r in rows] if prompt_len is not None else rows
        # ChatGLM-6B's context before <sop> attends both ways: it goes through in one chunk, however long
        bidir = (self._glm1_prompt(prompts[0])[0] or 0) if self.config.rope == "2d" else 0
        outs = []
        s = start
        while s < start + n:
            m = min(max(self.prefill_chunk, bidir - s), start + n - s)
            tok = torch.tensor([r[s : s + m] for r in rows])
            pos = torch.cat([self.positions(r, s, m) for r in prompts])
            mask = self._mask(prompts[0], s, m)
            for r in prompts[1:]:
                other = self._mask(r, s, m)
                if (other is None) != (mask is None) or (mask is not None and not torch.equal(other, mask)):
                    raise ValueError("rows of a batch need the same attention mask "
                                     "(ChatGLM-6B: [gMASK] and <sop> at the same index in every prompt)")
            outs.append(self.net.hidden(tok, pos, caches, P + s, mask))
            s += m
        return torch.cat(outs, dim=1)

    def _check_len(self, n: int):
        if n > self.ctx:
            raise ContextError(f"input has {n} tokens but the context window is {self.ctx} tokens "
                               f"(model {self.config.generation}, max {self.config.max_length})")
        if n == 0:
            raise ValueError("input_ids is empty")

    @staticmethod
    def _as_list(input_ids) -> list[int]:
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dim() != 1:
                raise ValueError(f"input_ids must be 1-D, got shape {tuple(input_ids.shape)}")
            return input_ids.tolist()
        if isinstance(input_ids, (str, bytes)):
            raise TypeError("input_ids must be token ids, not text: encode it with model.tokenizer, or use chat()")
        return [int(i) for i in input_ids]

    @staticmethod
    def _check_budget(max_new_tokens) -> int:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        return max_new_tokens

    @torch.inference_mode()
    def logits(self, input_ids) -> torch.Tensor:
        """fp32 logits [len(input_ids), vocab] from one full forward pass."""
        ids = self._as_list(input_ids)
        self._check_len(len(ids))
        caches = self.new_cache(self.config.pre_seq_len + len(ids))
        h = self.forward(ids, 0, len(ids), caches)
        return self.net.head(h).float().cpu()

    def stream_generate(self, input_ids, max_new_tokens: int = 256, do_sample: bool = False,
                        temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                        repetition_penalty: float = 1.0, seed: int | None = None,
                        stop_token_ids=None, prompt_cache: PromptCache | None = None) -> Iterator[int]:
        """New token ids one at a time; stops at a stop id (not yielded), max_new_tokens, or the context end.
        prompt_cache: reuse the keys and values of the prompt's prefix that the last call with it computed."""
        params = Sampling(do_sample, temperature, top_p, top_k, repetition_penalty, seed)
        ids = self._as_list(input_ids)
        self._check_len(len(ids))
        self._check_budget(max_new_tokens)
        stops = set(self.config.eos_token_ids if stop_token_ids is None else stop_token_ids)
        return (step[0] for step in self._stream_batch([ids], max_new_tokens, [params], stops, prompt_cache))

    def generate(self, input_ids, max_new_tokens: int = 256, **kw) -> list[int]:
        """New token ids (stop id excluded); the KV cache makes each step one token's work."""
        return list(self.stream_generate(input_ids, max_new_tokens=max_new_tokens, **kw))

    def stream_batch(self, prompts, max_new_tokens: int = 256, do_sample: bool = False, temperature: float = 1.0,
                     top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
                     stop_token_ids=None) -> Iterator[list[int | None]]:
        """One new id per row per step (None for a row that has stopped), all rows through one forward.

        Decode is bound by reading the weights, so B rows cost about one row's time until the matmuls
        become compute-bound (GPTQ's self-written calibration text is made this way). The prompts need
        equal lengths. Row r samples with seed + r, as generate(seed=seed + r) would; a row ends at its
        first stop id (not yielded) while the others go on.
        """
        rows = [self._as_list(p) for p in prompts]
        if any(len(r) != len(rows[0]) for r in rows):
            raise ValueError(f"a batch needs prompts of equal length, got lengths {sorted({len(r) for r in rows})}")
        if rows:
            self._check_len(len(rows[0]))
        self._check_budget(max_new_tokens)
        params = [Sampling(do_sample, temperature, top_p, top_k, repetition_penalty, None if seed is None else seed + r)
                  for r in range(len(rows))]
        stops = set(self.config.eos_token_ids if stop_token_ids is None else stop_token_ids)
        return self._stream_batch(rows, max_new_tokens, params, stops) if rows else iter(())

    @torch.inference_mode()
    def _stream_batch(self, rows: list[list[int]], max_new_tokens: int, params: list[Sampling],
                      stops: set[int], prompt_cache: PromptCache | None = None) -> Iterator[list[int | None]]:
        """The decode loop of stream_generate (one row) and stream_batch: rows grow in place, one id each a step."""
        gens = [p.generator() for p in params]
        total = min(self.ctx, len(rows[0]) + max_new_tokens)
        if total <= len(rows[0]):  # nothing to generate: no prompt pass either
            return
        caches, start = self._prompt_caches(rows, self.config.pre_seq_len + total, prompt_cache)
        written = [start]  # tokens of rows[0] whose keys and values are in the cache (_decode updates it)
        try:
            yield from self._decode(rows, total, caches, start, params, gens, stops, written)
        finally:  # also when the caller stops early or an interrupt lands mid-prompt
            if prompt_cache is not None and caches is prompt_cache.caches:
                prompt_cache.ids = rows[0][: written[0]]

    def _prompt_caches(self, rows, slots: int, pc: PromptCache | None):
        """(caches, tokens already in them): the prompt cache's, grown when short, or new ones."""
        P = self.config.pre_seq_len
        usable = (pc is not None and len(rows) == 1 and self.config.rope != "2d" and not self.kv_int8)
        if usable and pc.model_id != self.uid:
            pc.clear()
            pc.model_id = self.uid
        start = _common_prefix(rows[0], pc.ids, len(rows[0]) - 1) if usable and pc.caches is not None else 0
        if start and pc.caches[0][0].shape[2] >= slots:
            caches = pc.caches
        else:
            caches = self.new_cache(slots, batch=len(rows))
            for old, new in zip(pc.caches or [], caches) if start else ():
                for o, n in zip(old, new):
                    n[:, :, : P + start] = o[:, :, : P + start]
        if usable:
            pc.caches, pc.ids, pc.reused = caches, [], start  # ids set when this call ends (see _stream_batch)
        return caches, start

    def _decode(self, rows, total, caches, start, params, gens, stops, written):
        live = [True] * len(rows)
        prompt_len = len(rows[0])
        h = self.forward_rows(rows, start, len(rows[0]) - start, caches)[:, -1:]
        written[0] = len(rows[0])
        while len(rows[0]) < total:
            logits = self.net.head(h)[:, 0].float().cpu()
            step: list[int | None] = []
            for r, row in enumerate(rows):
                nxt = row[-1]  # a finished row repeats its last id: the batch stays rectangular
                if live[r]:
                    seen = torch.tensor(row) if params[r].repetition_penalty != 1.0 else torch.empty(0, dtype=torch.long)
                    nxt = select(logits[r], params[r], seen, gens[r])
                    live[r] = nxt not in stops
                step.append(nxt if live[r] else None)
                row.append(nxt)
            if not any(live):
                return
            yield step
            if len(rows[0]) >= total:
                return
            h = self.forward_rows(rows, len(rows[0]) - 1, 1, caches, prompt_len)
            written[0] = len(rows[0])

    def generate_batch(self, prompts, max_new_tokens: int = 256, **kw) -> list[list[int]]:
        """New ids per row (stop ids excluded), from stream_batch."""
        out: list[list[int]] = [[] for _ in prompts]
        for step in self.stream_batch(prompts, max_new_tokens=max_new_tokens, **kw):
            for r, t in enumerate(step):
                if t is not None:
                    out[r].append(t)
        return out

    # ---- chat: thin wrappers over lowvram/chat.py ---------------------------------------------

    def chat(self, query_or_messages, history=None, **gen):
        """(response, history), THUDM style: a query string + history, or a list of messages."""
        from .chat import chat

        return chat(self, query_or_messages, history, **gen)

    def stream_chat(self, query_or_messages, history=None, **gen):
        """A ChatStream: iterate for text deltas, then read .response / .history / .message."""
        from .chat import stream_chat

        return stream_chat(self, query_or_messages, history, **gen)

    def chat_completion(self, messages, tools=None, **gen) -> dict:
        """An OpenAI-shaped assistant message (content and/or tool_calls)."""
        from .chat import chat_completion

        return chat_completion(self, messages, tools=tools, **gen)

    def __repr__(self) -> str:
        return f"Model({self.config.generation}, layers={self.config.num_layers}, dtype={self.dtype}, path={self.path})"


def load(path: str | Path, device: str = "cpu", dtype=None, backend: str | None = None, placement=None,
         ctx: int | None = None, chat_format: str | None = None, tokenizer: bool = True,
         max_memory: dict | str | None = None, stream: bool = False, repack_cache: bool | None = None) -> Model:
    """Load a checkpoint directory (original Hugging Face layout, or lowvram/GPTQ quantized).

    repack_cache: keep the CPU kernel's repacked weights in a file for the next load (repack_cache.py); None =
    on unless LOWVRAM_CACHE=0.

    device="auto" (or a max_memory budget) places blocks with the planner: the fastest device first,
    the rest on the CPU (stream=True: the rest stream through the GPU, see streaming.py); an explicit
    `placement` ("cuda:0=0-19,cpu=20-39", "cuda:0=0-29,stream:cuda:0=30-39") overrides it.
    """
    from .config import load_config
    from .loading import build, layer_devices

    if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, numbers.Integral) or ctx < 1):
        raise ValueError(f"ctx must be a positive number of tokens (or None for the model's own), got {ctx!r}")
    cfg = load_config(path)
    if placement is None and (device == "auto" or max_memory is not None):
        placement, device = _auto_placement(cfg, max_memory, ctx, path, stream)
    elif device == "auto":  # an explicit placement decides: its first block's device
        device = str(layer_devices(placement, "cpu", cfg.num_layers)[0])
    tok = None
    if tokenizer:  # before the weights: a load error then names the generation the tokenizer tells
        tok = _try_tokenizer(path, cfg, chat_format)
        if tok is not None:  # ChatGLM2 and ChatGLM3 share config.json: the tokenizer files decide
            from .tokenizer import generation_for

            cfg.generation = generation_for(tok, cfg.generation)
    net, cfg, report = build(path, device=device, dtype=dtype, backend=backend, placement=placement, cfg=cfg,
                             repack_cache=repack_cache)
    return Model(net, cfg, path, tok, report, ctx)


def _auto_placement(cfg, max_memory, ctx, path=None, stream=False):
    from .loading import embeddings_will_map
    from .placement import check_budgets, detect_budgets, plan, quantized_as

    budgets = detect_budgets() if max_memory is None else check_budgets(max_memory)
    bits, group = quantized_as(cfg)
    p = plan(cfg, budgets, ctx or min(cfg.max_length, 8192), bits, group,
             mapped_embeddings=path is not None and embeddings_will_map(path), stream=stream)
    return p.placement(), p.devices[0]


def _try_tokenizer(path, cfg, chat_format):
    try:
        from .tokenizer import load_tokenizer, TokenizerNotFound
    except ImportError:
        return None
    try:
        return load_tokenizer(path, chat_format=chat_format, config=cfg)
    except TokenizerNotFound:
        return None
