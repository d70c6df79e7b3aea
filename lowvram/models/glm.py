"""The GLM transformer, every text generation in one file.

ChatGLM-6B, ChatGLM2/3, CodeGeeX2, GLM-4(-1M), glm-4-9b-chat-hf and GLM-4-0414 are the same
decoder with a few switches taken from `GLMConfig`:

* norm:     LayerNorm with bias (ChatGLM-6B) or RMSNorm computed in fp32 (all later ones)
* residual: "deepnorm" (ChatGLM-6B: the residual is the *normalised* input times alpha),
            "pre" (pre-norm), "sandwich" (GLM-4-0414: extra norms after attention and MLP)
* qkv:      ChatGLM-6B interleaves q|k|v per head; later ones store all q rows, then k, then v,
            with fewer kv heads (MQA/GQA)
* RoPE:     "2d" (ChatGLM-6B: first half of each head rotates with the position, second half
            with the block position, NeoX rotate-half, fp16 tables) or "interleaved" (GPT-J
            pairs on the first `rotary_dim` dims of each head)
* MLP:      tanh-GELU (ChatGLM-6B) or SwiGLU with gate and up fused in one matrix

Shapes: activations are [batch, time, features]; the KV cache is [batch, kv_heads, slots, head_dim].
Layers may live on different devices (placement); the hidden state follows them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GLMConfig
from ..kernels import fused  # C versions of a CPU decode step's small ops; each returns None where it does not apply


def _embedding(n: int, dim: int) -> nn.Embedding:
    """An embedding table without nn's random init: the checkpoint fills it, and normal_ on the meta device
    (where the loader builds the model) imports torch._dynamo and sympy, ~67 MB of RSS for nothing."""
    return nn.Embedding(n, dim, _weight=torch.empty(n, dim))


class Norm(nn.Module):
    def __init__(self, cfg: GLMConfig):
        super().__init__()
        self.kind = cfg.norm
        self.eps = cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.hidden_size))
        self.bias = nn.Parameter(torch.zeros(cfg.hidden_size)) if cfg.norm == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        if (y := fused.rms_norm(x, self.weight, self.eps)) is not None:
            return y
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


def rope_tables(cfg: GLMConfig, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for positions `pos` ([B, T], or [B, 2, T] for 2D RoPE), shaped to broadcast over heads."""
    half = cfg.rotary_dim // 2
    inv = 1.0 / (cfg.rope_base ** (torch.arange(0, cfg.rotary_dim, 2, device=pos.device, dtype=torch.float32) / cfg.rotary_dim))
    if cfg.rope == "2d":
        # The original computes these tables in fp16, positions included.
        f = pos.half().unsqueeze(-1) * inv.half()  # [B, 2, T, half]
        f = torch.cat([f, f], dim=-1)  # NeoX layout: [freqs, freqs]
        cos, sin = f.cos().float(), f.sin().float()
        # -> [B, T, 1, 2, rotary_dim]: (position half, block-position half)
        return cos.permute(0, 2, 1, 3).unsqueeze(2), sin.permute(0, 2, 1, 3).unsqueeze(2)
    f = pos.float().unsqueeze(-1) * inv  # [B, T, half]
    assert f.shape[-1] == half
    return f.cos().unsqueeze(2), f.sin().unsqueeze(2)  # [B, T, 1, half]


def apply_rope(cfg: GLMConfig, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, head_dim] -> same, rotated."""
    if cfg.rope == "2d":
        xs = x.unflatten(-1, (2, -1))  # two halves of head_dim
        a, b = xs.chunk(2, dim=-1)  # NeoX rotate_half within each half
        rot = torch.cat([-b, a], dim=-1)
        return (xs * cos + rot * sin).to(x.dtype).flatten(-2)
    r = cfg.rotary_dim
    xr = x[..., :r].unflatten(-1, (-1, 2))
    x0, x1 = xr[..., 0], xr[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
    return torch.cat([out.to(x.dtype), x[..., r:]], dim=-1)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
    """One query over the cache, heads grouped per kv head: two small matmuls.

    SDPA's CPU flash kernel spends ~6 ms on this shape (1 query, bf16, GQA), longer than the
    layer's weights take to stream. `last` (a tensor slot index) masks the slots after it, so a
    CUDA graph can attend over the whole preallocated cache with fixed shapes.
    """
    B, H, _, D = q.shape
    G = k.shape[1]
    qg = q.view(B, G, H // G, D).float()
    s = torch.matmul(qg, k.float().transpose(-1, -2)) * D**-0.5  # [B, G, H/G, S]
    if last is not None:
        s = s.masked_fill(torch.arange(k.shape[2], device=s.device) > last, float("-inf"))
    o = torch.matmul(torch.softmax(s, dim=-1), v.float())
    return o.view(B, H, 1, D).to(q.dtype)


class Int8KV:
    """A layer's KV cache in int8 with one scale per (head, slot): half of bf16's bytes, for the 128K/1M
    context models. Same [batch, kv_heads, slots, head_dim] layout; read back in the compute dtype. A bf16
    decode step on the CPU writes and reads it in C (kernels.fused.attend_one: the same rounding as `write`)."""

    def __init__(self, shape, dtype, device):
        self.dtype = dtype
        self.q = [torch.zeros(shape, dtype=torch.int8, device=device) for _ in range(2)]
        self.s = [torch.zeros(*shape[:-1], 1, dtype=torch.float32, device=device) for _ in range(2)]

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor):
        T = k.shape[2]
        for q, s, x in zip(self.q, self.s, (k, v)):
            scale = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
            q[:, :, start : start + T] = torch.round(x.float() / scale).to(torch.int8)
            s[:, :, start : start + T] = scale

    def read(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple((q[:, :, :end].float() * s[:, :, :end]).to(self.dtype) for q, s in zip(self.q, self.s))

    def attend_one(self, q: torch.Tensor, end: int) -> torch.Tensor:
        """decode_attention over slots 0..end with the scales kept out of the cache: int8 values are exact in
        bf16/fp16, so the codes are only cast, and each slot's scale multiplies its score and its weight. Reading
        the cache back scaled in fp32 and again in the compute dtype moved ~29 bytes per cached value, not ~5: at
        a 128K context that is most of a token's time."""
        B, H, _, D = q.shape
        (kq, vq), (ks, vs) = [t[:, :, :end] for t in self.q], [t[:, :, :end] for t in self.s]
        G = kq.shape[1]
        # scores in fp32 (a bf16 product of unscaled codes would round each score by 0.4%: softmax weights off by
        # several %); the weighted sum of values in the compute dtype on a GPU (its result is rounded to it anyway)
        cdt = torch.float32 if q.device.type == "cpu" else q.dtype
        qg = q.view(B, G, H // G, D).float()
        sc = torch.matmul(qg, kq.float().transpose(-1, -2)) * (ks.transpose(-1, -2) * D**-0.5)
        p = torch.softmax(sc, dim=-1) * vs.transpose(-1, -2)  # [B, G, H/G, S]
        return torch.matmul(p.to(cdt), vq.to(cdt)).view(B, H, 1, D).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: GLMConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.out = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.linear_bias)

    def forward(self, x, rope, cache, start, mask):
        cfg = self.cfg
        B, T, _ = x.shape
        H, G, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv = self.qkv(x)
        threads = getattr(self.qkv, "threads", 0)  # the native kernel's: attention runs on as many
        if T == 1 and mask is None and (o := fused.attend_one(cfg, qkv, rope, cache, start, threads)) is not None:
            return self.out(o)
        if T > 1 and mask is None and (o := fused.attend_rows(cfg, qkv, rope, cache, start, threads)) is not None:
            return self.out(o)
        if cfg.layout == "chatglm-v1":
            q, k, v = qkv.view(B, T, H, 3 * D).split(D, dim=-1)
        else:
            q, k, v = qkv.split([H * D, G * D, G * D], dim=-1)
            q, k, v = q.view(B, T, H, D), k.view(B, T, G, D), v.view(B, T, G, D)
        q, k = apply_rope(cfg, q, *rope), apply_rope(cfg, k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if isinstance(start, torch.Tensor):  # graph-captured decode: the slot is a tensor, shapes stay fixed
            kc, vc = cache
            kc.index_copy_(2, start, k)
            vc.index_copy_(2, start, v)
            return self.out(decode_attention(q, kc, vc, start).transpose(1, 2).reshape(B, T, H * D))
        if isinstance(cache, Int8KV):
            cache.write(start, k, v)
            if T == 1 and mask is None:
                return self.out(cache.attend_one(q, start + 1).transpose(1, 2).reshape(B, T, H * D))
            k, v = cache.read(start + T)
        elif cache is not None:
            kc, vc = cache
            kc[:, :, start : start + T] = k
            vc[:, :, start : start + T] = v
            k, v = kc[:, :, : start + T], vc[:, :, : start + T]
        if T == 1 and mask is None and not q.is_cuda:
            o = decode_attention(q, k, v)
        else:  # CUDA's SDPA reads the bf16 cache as it is (decode_attention's fp32 copies would move 5x its bytes)
            if mask is None and k.shape[2] > T > 1:  # causal over the cache slots: row i sees slots 0..start+i
                mask = torch.arange(k.shape[2], device=q.device) <= torch.arange(start, start + T, device=q.device)[:, None]
            causal = mask is None and T > 1
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=G != H)
        return self.out(o.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, cfg: GLMConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        n_up = 2 * cfg.ffn_hidden_size if self.swiglu else cfg.ffn_hidden_size
        self.up = nn.Linear(cfg.hidden_size, n_up, bias=cfg.linear_bias)
        self.down = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=cfg.linear_bias)

    def forward(self, x):
        h = self.up(x)
        if self.swiglu:
            if (y := fused.swiglu(h)) is not None:
                return self.down(y)
            a, b = h.chunk(2, dim=-1)
            return self.down(F.silu(a) * b)
        return self.down(F.gelu(h, approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GLMConfig):
        super().__init__()
        self.residual = cfg.residual
        self.alpha = cfg.deepnorm_alpha
        self.attn_norm = Norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = Norm(cfg)
        self.mlp = MLP(cfg)
        if cfg.residual == "sandwich":
            self.post_attn_norm = Norm(cfg)
            self.post_mlp_norm = Norm(cfg)

    def forward(self, x, rope, cache=None, start=0, mask=None):
        if mask is None and (y := fused.decode_block(self, x, rope, cache, start)) is not None:
            return y
        if self.residual == "deepnorm":
            h = self.attn_norm(x)
            x = h * self.alpha + self.attn(h, rope, cache, start, mask)
            h = self.mlp_norm(x)
            return h * self.alpha + self.mlp(h)
        a = self.attn(self.attn_norm(x), rope, cache, start, mask)
        if self.residual == "sandwich":
            a = self.post_attn_norm(a)
        x = x + a
        m = self.mlp(self.mlp_norm(x))
        if self.residual == "sandwich":
            m = self.post_mlp_norm(m)
        return x + m


class PrefixEncoder(nn.Module):
    """P-tuning v2: learned keys/values for `pre_seq_len` virtual tokens in front of every prompt."""

    def __init__(self, cfg: GLMConfig):
        super().__init__()
        self.cfg = cfg
        width = cfg.num_layers * 2 * cfg.kv_size
        if cfg.prefix_projection:
            self.embedding = _embedding(cfg.pre_seq_len, cfg.hidden_size)
            self.trans = nn.Sequential(
                nn.Linear(cfg.hidden_size, cfg.prefix_hidden_size), nn.Tanh(), nn.Linear(cfg.prefix_hidden_size, width)
            )
        else:
            self.embedding = _embedding(cfg.pre_seq_len, width)
            self.trans = None

    def forward(self) -> torch.Tensor:
        """[num_layers*2, kv_heads, pre_seq_len, head_dim]; index 2l = keys of layer l, 2l+1 values."""
        cfg = self.cfg
        p = self.embedding.weight
        if self.trans is not None:
            p = self.trans(p)
        return p.view(cfg.pre_seq_len, cfg.num_layers * 2, cfg.num_kv_heads, cfg.head_dim).permute(1, 2, 0, 3)


class FileEmbedding(nn.Module):
    """Word embeddings looked up in the checkpoint file (CPU, untied models only).

    Only the rows of looked-up tokens are ever read, so the table (0.5-1.2 GB for 65K-152K x 4096 in
    fp16) stays out of RSS. Rows are converted to the compute dtype after the lookup (an fp16 file under
    bf16 or fp32 compute); elementwise, that equals converting the whole table first, bit for bit.
    `weight` is the table in its file (`checkpoint.FileRows`: shape, dtype, device), not a parameter, so
    `.to()`/`.half()` on the network never touch it.
    """

    def __init__(self, table, dtype: torch.dtype):
        super().__init__()
        self.weight = table
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.rows(ids).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, file dtype {self.weight.dtype}, compute dtype {self.dtype}, in the file"


class GLM(nn.Module):
    def __init__(self, cfg: GLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = _embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = Norm(cfg)
        self.output = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.prefix = PrefixEncoder(cfg) if cfg.pre_seq_len else None

    def layer_device(self, i: int) -> torch.device:
        """Where block i computes (a streamed block keeps its weights on the CPU but runs on `.device`)."""
        layer = self.layers[i]
        return layer.attn_norm.weight.device if isinstance(layer, Block) else layer.device

    def hidden(self, x, pos, caches=None, start=0, mask=None):
        """Final-norm hidden states for embeddings or ids `x` at positions `pos`.

        caches: one (k, v) pair per layer, written at slots [start, start+T); None = no cache.
        mask: bool [T, start+T] (True = may attend), or None for causal over the cache slots (row i sees
        slots 0..start+i: a prefix or an earlier chunk whole).
        """
        if not torch.is_floating_point(x):
            x = self.embed(x.to(self.embed.weight.device))
        ropes = {}
        if mask is None and self.layer_device(0) == x.device:
            ropes[x.device] = rope_tables(self.cfg, pos.to(x.device))
            if (y := fused.decode_blocks(self.layers, x, ropes[x.device], caches, start)) is not None:
                return self.norm(y)
        for i, layer in enumerate(self.layers):
            dev = self.layer_device(i)
            if dev not in ropes:
                ropes[dev] = rope_tables(self.cfg, pos.to(dev))
            x = x.to(dev)
            m = None if mask is None else mask.to(dev)
            x = layer(x, ropes[dev], None if caches is None else caches[i], start, m)
        return self.norm(x.to(self.norm.weight.device))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        # As 2-D rows: given a prompt's last position, a [B, 1, K] slice whose batch stride is not K, torch's CPU
        # matmul took the bmm path and first copied the whole transposed float weight (ChatGLM3-6B's bf16 head:
        # 0.53 GB and ~2 s added to every prompt's first token).
        rows = h.reshape(-1, h.shape[-1])
        if self.output is None:  # tied (ChatGLM-6B)
            y = F.linear(rows.to(self.embed.weight.device), self.embed.weight)
        else:
            y = self.output(rows)
        return y.reshape(*h.shape[:-1], y.shape[-1])
