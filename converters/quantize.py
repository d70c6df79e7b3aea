"""`lowvram quantize`: INT8/INT4 round-to-nearest or GPTQ, written in the standard GPTQ format.

The output loads in lowvram, and in transformers+GPTQModel or vLLM for the same model family:
per quantized linear `qweight`/`qzeros`/`scales`/`g_idx` under the original tensor names,
`quantization_config` in config.json and a `quantize_config.json` (checkpoint_format "gptq", v1
zeros). Tensors stream one at a time from the source to size-capped shards in a temporary
directory that is renamed into place only when everything is written.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lowvram.bench import peak_rss
from lowvram.checkpoint import Checkpoint, map_name
from lowvram.config import load_config
from lowvram.loading import check_float_tensors, trim_heap

from . import atomic_directory, public
from .gptq import Hessian, gptq, rtn

BLOCK_LINEAR = re.compile(r"layers\.(\d+)\.(attn\.qkv|attn\.out|mlp\.up|mlp\.down)\.weight$")
COPY_FILES = ("tokenizer.model", "ice_text.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "added_tokens.json", "vocab.json", "merges.txt", "preprocessor_config.json")


class ShardWriter:
    """Safetensors shards of at most `max_bytes`, named and indexed like save_pretrained's."""

    def __init__(self, folder: Path, max_bytes: int = 2 << 30):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor):
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        if self.pending and self.size + nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = t.clone() if t.untyped_storage().nbytes() > nbytes else t
        self.size += nbytes
        self.total += nbytes

    def flush(self):
        if not self.pending:
            return
        fname = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.folder / fname), metadata={"format": "pt"})
        public(self.folder / fname)
        self.files.append((fname, list(self.pending)))
        self.pending, self.size = {}, 0

    def finish(self):
        self.flush()
        n = len(self.files)
        if n == 1:
            os.replace(self.folder / self.files[0][0], self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, (fname, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / fname, self.folder / final)
            weight_map.update({k: final for k in names})
        idx = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(idx, indent=2))


class Progress:
    """A one-line bar with ETA on a terminal; silent when stderr is not one."""

    def __init__(self, total: int, label: str, enabled: bool | None = None):
        self.total, self.label, self.done, self.t0 = max(total, 1), label, 0, time.time()
        self.on = sys.stderr.isatty() if enabled is None else enabled

    def step(self, what: str = ""):
        self.done += 1
        if not self.on:
            return
        el = time.time() - self.t0
        eta = el / self.done * (self.total - self.done)
        bar = "#" * int(30 * self.done / self.total)
        sys.stderr.write(f"\r{self.label} [{bar:30s}] {self.done}/{self.total} ETA {eta:5.0f}s {what[:40]:40s}")
        sys.stderr.flush()
        if self.done == self.total:
            sys.stderr.write("\n")


def quantize(source, out, bits: int = 4, method: str = "rtn", group_size: int = 128, sym: bool = True,
             act_order: bool = False, calib: str | None = None, calib_samples: int = 32, calib_seq_len: int = 128,
             device: str = "cpu", force: bool = False, quantize_head: bool = False, head_bits: int = 8,
             head_group_size: int = -1,
             max_shard_bytes: int = 512 << 20, progress: bool | None = None, seed: int = 0,
             mse: bool | None = None, calib_model: str = "auto") -> dict:
    """Quantize checkpoint `source` (a directory or a known model name) into `out`; returns a summary.

    mse: search each group's clipping range for the lowest squared rounding error (`gptq.fit`);
    None = on for 4-bit tensors, off for 8-bit ones (measured: it lowers INT4 perplexity loss, and at
    8 bits the best range is the full one, so the search would only cost time; see BENCHMARKS.md).
    calib_model: what writes GPTQ's calibration text when `calib` is None ("auto", "source", "int8";
    see `_sampling_model`).
    """
    from .hub import resolve

    if bits not in (4, 8):
        raise ValueError(f"--bits must be 4 or 8, got {bits}")
    if method not in ("rtn", "gptq"):
        raise ValueError(f"--method must be rtn or gptq, got {method!r}")
    if calib_model not in ("auto", "source", "int8"):
        raise ValueError(f"--calib-model must be auto, source or int8, got {calib_model!r}")
    for flag, g in (("--group-size", group_size), ("--head-group-size", head_group_size)):
        if g == 0 or g < -1:
            raise ValueError(f"{flag} must be -1 (one group per row) or a positive number of columns, got {g}")
    if method == "rtn":  # options only GPTQ uses: refused rather than silently ignored (or recorded untrue)
        given = [f for f, on in (("--act-order", act_order), ("--calib", calib), ("--device", device != "cpu")) if on]
        if given:
            raise ValueError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --method gptq only (round-to-nearest runs on the CPU "
                             "without calibration)")
    else:
        from lowvram.loading import check_device

        check_device(device, "--device")
        if calib_samples < 1 or calib_seq_len < 1:
            raise ValueError(f"--calib-samples and --calib-seq-len must be >= 1, got {calib_samples} and {calib_seq_len}")
    if not quantize_head and (head_bits != 8 or head_group_size != -1):
        raise ValueError("--head-bits and --head-group-size apply with --quantize-head only")
    src = resolve(source)
    cfg = load_config(src)
    if cfg.quantization:
        raise ValueError(f"{src}: already quantized ({cfg.quantization}); quantize a full-precision checkpoint")
    if method == "gptq" and cfg.pre_seq_len:
        raise ValueError(f"{src}: GPTQ of P-tuning v2 checkpoints is not supported; use --method rtn")
    ckpt = Checkpoint(src)  # every shard opened and indexed before any work: bad files fail here
    check_float_tensors(ckpt, cfg)  # and every tensor the config needs is there, in its shape
    out = Path(out)
    _check_output(out, Path(src), force)
    if group_size > 0:  # every block linear's input width must split into whole groups; say so before any work
        widths = {"hidden_size": cfg.hidden_size, "ffn_hidden_size": cfg.ffn_hidden_size,
                  "attention output (heads x head_dim)": cfg.q_size}
        bad = [f"{k} {v}" for k, v in widths.items() if v % group_size]
        if bad:
            raise ValueError(f"--group-size {group_size} does not divide {', '.join(bad)} of {src}; "
                             "pick a group size that divides them (e.g. 32) or -1 for one group per row")
    if quantize_head and head_group_size > 0 and cfg.hidden_size % head_group_size:
        raise ValueError(f"--head-group-size {head_group_size} does not divide hidden_size {cfg.hidden_size} of {src}; "
                         "pick one that divides it or -1 for one group per row")
    t0 = time.time()
    size_in = ckpt.nbytes()
    use_mse = lambda b: (b == 4) if mse is None else bool(mse)  # noqa: E731
    errors: dict[str, float] = {}
    with atomic_directory(out) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        names = ckpt.names()
        is_q = lambda ours: bool(BLOCK_LINEAR.search(ours)) or (quantize_head and ours == "output.weight")  # noqa: E731
        written: set[str] = set()
        calibration = None
        if method == "gptq":  # block linears are written as GPTQ finishes each block (nothing accumulates)
            ids, calibration = _calibration_ids(src, cfg, calib, calib_samples, calib_seq_len, seed, device,
                                                calib_model, tmp, progress)
            written = _calibrate(src, cfg, ckpt, ids, bits, group_size, sym, act_order, device,
                                 Progress(cfg.num_layers, "gptq calibration", progress), use_mse(bits), writer, errors)
        bar = Progress(len(names) - len(written), f"quantize {method} int{bits}", progress)
        for cname, t in ckpt.items(skip=written):
            mapped = map_name(cfg.layout, cname)
            ours = mapped[0] if mapped else None
            prefix = cname[: -len(".weight")]
            if ours and is_q(ours) and torch.is_floating_point(t):
                _check_finite(t, cname, src)
                head = ours == "output.weight"
                b, g = (head_bits, head_group_size) if head else (bits, group_size)
                # row chunks: no fp32 copy of t
                tensors, errors[cname] = rtn(t, b, g, sym, keep_deq=False, mse=use_mse(b))
                del t
                for k, v in tensors.items():
                    writer.add(f"{prefix}.{k}", v)
            elif ours is not None or mapped is None:
                writer.add(cname, t)
            bar.step(cname)
        writer.finish()
        _write_metadata(src, tmp, cfg, bits, group_size, sym, act_order, method, quantize_head, head_bits,
                        use_mse(bits), use_mse(head_bits), calibration, head_group_size, out)
    size_out = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    errs = sorted(errors.values())
    return {
        "source": str(src), "out": str(out), "method": method, "bits": bits, "group_size": group_size,
        "seconds": round(time.time() - t0, 2), "size_in": size_in, "size_out": size_out,
        "peak_rss_bytes": peak_rss(),
        "quantized_linears": len(errors), "mse": use_mse(bits), "calibration": calibration,
        "rel_error": {"min": errs[0], "median": errs[len(errs) // 2], "max": errs[-1]} if errs else None,
    }


def _check_output(out: Path, src: Path, force: bool) -> None:
    """Everything about -o that would otherwise fail after the work, or destroy the source with --force."""
    o, sr = out.resolve(), src.resolve()
    if o == sr or o in sr.parents:
        raise ValueError(f"-o {out}: {'that is' if o == sr else 'it contains'} the source checkpoint; write elsewhere")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"-o {out}: a file, not a checkpoint directory")
    top = next(p for p in o.parents if p.exists())  # where the first directory of the path will be made
    if not top.is_dir():
        raise ValueError(f"-o {out}: {top} is a file, not a directory")
    if not os.access(top, os.W_OK | os.X_OK):
        raise ValueError(f"-o {out}: no permission to write in {top}")


def _check_finite(t: torch.Tensor, cname: str, src) -> None:
    """NaN or inf in a weight quantizes to garbage that the error statistics would hide."""
    if not all(bool(torch.isfinite(t[r : r + 4096]).all()) for r in range(0, t.shape[0], 4096)):
        raise ValueError(f"{src}: tensor {cname} has NaN or infinite values; the source checkpoint is broken")


def _calibrate(src, cfg, ckpt, ids, bits, group, sym, act_order, device, bar, mse, writer, errors) -> set[str]:
    """GPTQ of every block linear, block by block, each block fed by the already-quantized ones.

    Only the embeddings (for the lookup) and one block are materialised (fp32, on `device`) at a time,
    and each block's GPTQ tensors go to `writer` as soon as they exist, so memory is one block, its
    largest Hessian with its Cholesky factors, and the calibration activations, whatever the number of
    blocks. Returns the checkpoint names whose quantized form is written (glm's fused qkv is split
    back into its q/k/v tensors); `errors` gets each one's relative weight error.
    """
    from lowvram.checkpoint import FUSED_PARTS
    from lowvram.kernels import pack_cols, unpack_cols
    from lowvram.model import Model
    from lowvram.models.glm import GLM, rope_tables

    with torch.device("meta"):
        net = GLM(cfg)
    model = Model(net, cfg, src, report={"dtype": torch.float32})  # for positions and masks only
    owners = _names_by_owner(ckpt, cfg)
    _materialise(net, ckpt, cfg, owners.get("embed", []), device)
    written: set[str] = set()

    def write(cname: str, tensors: dict, w: torch.Tensor, deq: torch.Tensor):
        prefix = cname[: -len(".weight")]
        for k, v in tensors.items():
            writer.add(f"{prefix}.{k}", v.cpu())
        rows = range(0, w.shape[0], 2048)  # row chunks: no whole-matrix temporaries
        err2 = sum(float((deq[r : r + 2048] - w[r : r + 2048]).square().sum()) for r in rows)
        w2 = sum(float(w[r : r + 2048].square().sum()) for r in rows)
        errors[cname] = (err2 / max(w2, 1e-24)) ** 0.5
        written.add(cname)

    with torch.no_grad():
        x = torch.stack([net.embed(torch.tensor(s, device=device)) for s in ids])  # [S, T, H]
        net.embed.to("meta")
        T = x.shape[1]
        rope = rope_tables(cfg, torch.cat([model.positions(s, 0, T) for s in ids]).to(device))
        mask = _calibration_mask(model, ids, T)
        mask = None if mask is None else mask.to(device)
        for i, block in enumerate(net.layers):
            _materialise(net, ckpt, cfg, owners.get(i, []), device)
            cnames = {map_name(cfg.layout, c): c for c in owners.get(i, [])}  # (ours, slot) -> file name
            lins = {"attn.qkv": block.attn.qkv, "attn.out": block.attn.out, "mlp.up": block.mlp.up,
                    "mlp.down": block.mlp.down}
            hs = {k: Hessian(m.in_features, device) for k, m in lins.items()}
            hooks = [m.register_forward_pre_hook(lambda _m, a, h=hs[k]: h.add(a[0])) for k, m in lins.items()]
            in_chunks(block, x, rope, mask, out=None)
            for h in hooks:
                h.remove()
            for k, m in lins.items():
                tensors, deq = gptq(m.weight, hs.pop(k).H, bits, group, sym, act_order, mse=mse, consume_h=True)
                name = f"layers.{i}.{k}.weight"
                if k == "attn.qkv" and cfg.layout in FUSED_PARTS:
                    sizes = [cfg.q_size, cfg.kv_size, cfg.kv_size]
                    z = unpack_cols(tensors["qzeros"], bits)
                    parts = zip(tensors["qweight"].split(sizes, 1), tensors["scales"].split(sizes, 1), z.split(sizes, 1),
                                m.weight.split(sizes, 0), deq.split(sizes, 0))
                    for slot, (qw, sc, zz, w, d) in enumerate(parts):
                        write(cnames[(name, slot)], {"qweight": qw, "qzeros": pack_cols(zz.contiguous(), bits),
                                                     "scales": sc, "g_idx": tensors["g_idx"].clone()}, w, d)
                    del z, parts, qw, sc, zz, w, d  # views of this block's weights: gone with the block
                else:
                    write(cnames[(name, None)], tensors, m.weight, deq)
                m.weight.copy_(deq)  # later blocks see this block quantized
                del tensors, deq
            in_chunks(block, x, rope, mask, out=x)  # in place: each chunk's rows are read before they are replaced
            net.layers[i] = block.to("meta")  # free this block before reading the next
            if bar is not None:
                bar.step(f"gptq block {i}")
    return written


CALIB_CHUNK_TOKENS = 2048


def _calibration_mask(model, ids, T):
    """ChatGLM-6B's attention mask of each calibration row (its bidirectional span ends at that row's <sop>):
    one [T, T] mask when the rows agree, else one per row [S, 1, T, T]; None for causal models."""
    masks = [model._mask(s, 0, T) for s in ids]
    if all(m is None for m in masks):
        return None
    if all(m is not None and torch.equal(m, masks[0]) for m in masks):
        return masks[0]
    pre = model.config.pre_seq_len
    causal = torch.ones(T, pre + T, dtype=torch.bool).tril(pre)  # prefix slots, then causal
    return torch.stack([causal if m is None else m for m in masks])[:, None]


def in_chunks(block, x, rope, mask, out):
    """The block over the calibration samples a few at a time: its intermediates (the MLP's 2 x 13696 columns,
    attention scores) then take memory for ~2048 tokens, not for all of them (128 x 2048 tokens would need
    tens of GB at ChatGLM3-6B's widths)."""
    c = max(1, CALIB_CHUNK_TOKENS // x.shape[1])
    for s in range(0, x.shape[0], c):
        m = mask[s : s + c] if mask is not None and mask.dim() == 4 else mask
        y = block(x[s : s + c], tuple(r[s : s + c] for r in rope), None, 0, m)
        if out is not None:
            out[s : s + c] = y


def _names_by_owner(ckpt, cfg) -> dict:
    """Checkpoint names grouped by what needs them: "embed" or a block index."""
    out: dict = {}
    for cname in ckpt.names():
        mapped = map_name(cfg.layout, cname)
        ours = mapped[0] if mapped else None
        if not ours:
            continue
        if ours.startswith("embed."):
            out.setdefault("embed", []).append(cname)
        elif ours.startswith("layers."):
            out.setdefault(int(ours.split(".")[1]), []).append(cname)
    return out


def _materialise(net, ckpt, cfg, cnames, device):
    """Read these checkpoint tensors into the meta network as fp32 parameters on `device`."""
    from torch import nn

    parts: dict[str, dict] = {}
    for cname in cnames:
        ours, slot = map_name(cfg.layout, cname)
        parts.setdefault(ours, {})[slot] = ckpt.get(cname)
    for ours, p in parts.items():
        t = p[None] if None in p else torch.cat([p[k] for k in sorted(p)], dim=0)
        mod_name, _, pname = ours.rpartition(".")
        net.get_submodule(mod_name)._parameters[pname] = nn.Parameter(t.to(device, torch.float32), requires_grad=False)


def _jsonl_rows(p: Path, text: str) -> list[dict]:
    """The rows of a jsonl calibration file, all {"text": str} or all {"input_ids": [int, ...]}."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"--calib {p}:{n}: not JSON ({e.msg}, column {e.colno})") from None
        ids = r.get("input_ids") if isinstance(r, dict) else None
        if not isinstance(r, dict) or not (isinstance(r.get("text"), str) or (
                isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids))):
            raise ValueError(f'--calib {p}:{n}: expected {{"text": "..."}} or {{"input_ids": [int, ...]}}')
        rows.append(r)
    if len({"input_ids" in r for r in rows}) > 1:
        raise ValueError(f"--calib {p}: rows mix 'text' and 'input_ids'; use one kind")
    return rows


def _calibration_ids(src, cfg, calib, samples, seq_len, seed, device, calib_model="auto", workdir=None,
                     progress=None) -> tuple[list[list[int]], dict]:
    """GPTQ's calibration sequences, and how they were made (recorded in the output's metadata)."""
    what = {"samples": samples, "seq_len": seq_len}
    if calib:
        from lowvram import load_tokenizer

        p = Path(calib)
        if not p.exists():
            raise FileNotFoundError(f"--calib {p}: no such file")
        if not p.is_file():
            raise ValueError(f"--calib {p}: not a file (expected text, or jsonl with 'text' or 'input_ids' rows)")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--calib {p}: not UTF-8 text (byte {e.start})") from None
        rows = _jsonl_rows(p, text) if p.suffix == ".jsonl" else None
        if rows is not None:  # pre-tokenized calibration: {"input_ids": [...]} per line, no tokenizer needed
            if rows and all("input_ids" in r for r in rows):
                seqs = [r["input_ids"][:seq_len] for r in rows if len(r["input_ids"]) >= seq_len][:samples]
                if not seqs:
                    raise ValueError(f"--calib {p}: no input_ids row has --calib-seq-len {seq_len} tokens")
                bad = [i for s in seqs for i in s if not 0 <= int(i) < cfg.vocab_size]
                if bad:
                    raise ValueError(f"--calib {p}: token id {bad[0]} outside the vocabulary (0..{cfg.vocab_size - 1})")
                return [[int(i) for i in s] for s in seqs], dict(what, data=p.name, samples=len(seqs))
        try:
            tok = load_tokenizer(src)
        except Exception as e:
            raise ValueError(f"--calib needs the source's tokenizer files; {src}: {e}") from None
        if rows is not None:
            text = "\n".join(r.get("text", "") for r in rows)
        ids = tok.encode(text)
        if len(ids) < seq_len:
            raise ValueError(f"--calib {p}: {len(ids)} tokens, fewer than --calib-seq-len {seq_len}")
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(ids) - seq_len + 1, (samples,), generator=g).tolist()
        return [ids[s : s + seq_len] for s in starts], dict(what, data=p.name)
    # No data given: the model writes its own calibration text, all sequences of a batch per step.
    model, sampler = _sampling_model(src, cfg, samples, seq_len, device, calib_model, workdir, progress)
    try:
        firsts = [int(torch.randint(0, cfg.vocab_size, (1,), generator=torch.Generator().manual_seed(seed + s)))
                  for s in range(samples)]
        batch = _sampling_batch(cfg, samples, seq_len)
        bar = Progress(-(-samples // batch) * (seq_len - 1), f"calibration text ({sampler} model)", progress)
        out = []
        for b in range(0, samples, batch):
            rows = [[f] for f in firsts[b : b + batch]]
            for step in model.stream_batch([list(r) for r in rows], max_new_tokens=seq_len - 1, do_sample=True,
                                           top_k=50, seed=seed + b, stop_token_ids=[]):
                for r, t in zip(rows, step):
                    r.append(t)
                bar.step()
            out += rows
    finally:
        del model  # freed before the block-by-block pass: the two never share memory
        gc.collect()
        trim_heap()
        if sampler == "int8":
            shutil.rmtree(workdir / "int8-sampler", ignore_errors=True)
    return out, dict(what, data="self-generated", sampler=sampler, batch=batch)


SAMPLING_KV_BYTES = 512 << 20  # KV cache of one sampling batch: rows per batch = this / one row's cache


def _sampling_batch(cfg, samples: int, seq_len: int) -> int:
    row = cfg.num_layers * 2 * cfg.kv_size * 2 * (cfg.pre_seq_len + seq_len)
    return max(1, min(samples, SAMPLING_KV_BYTES // row))


def _source_fits(src, cfg, samples, seq_len, device, budgets) -> bool:
    """Whether the full-precision source, sampling one batch, fits in 90% of `device`'s free memory."""
    from lowvram.memory import RUNTIME_OVERHEAD, footprint, predict_rss

    batch = _sampling_batch(cfg, samples, seq_len)
    if device == "cpu":  # the checkpoint's own tensors in the CPU's default dtype, mapped embeddings included
        need = predict_rss(src, prompt_len=batch * seq_len, new_tokens=0, cfg=cfg).peak
    else:
        need = footprint(cfg, bits=None).total(batch * seq_len, cfg.num_layers) + RUNTIME_OVERHEAD[device]
    return need <= 0.9 * budgets.get("cuda:0" if device == "cuda" else device, 0)


def _sampling_model(src, cfg, samples, seq_len, device, calib_model, workdir, progress):
    """The model that writes the calibration text, and which one it is ("source" or "int8").

    The source model itself when it fits in the free memory of `device` ("auto"), else an INT8
    per-channel RTN copy written in the output's temporary directory and removed after sampling:
    about half of bf16's bytes (GLM-4-9B samples in 9.15 GB, measured), from a model whose held-out
    perplexity is within 0.02% of the source's (BENCHMARKS.md). Freed before the block-by-block pass.
    """
    from lowvram import load
    from lowvram.placement import detect_budgets

    where = "cpu" if device == "cpu" else "auto"  # on a GPU the planner may leave blocks on the CPU
    if calib_model == "auto":
        calib_model = "source" if _source_fits(src, cfg, samples, seq_len, device, detect_budgets()) else "int8"
    if calib_model == "source":
        return load(src, device=where, tokenizer=False), "source"
    copy = workdir / "int8-sampler"
    quantize(src, copy, bits=8, group_size=-1, quantize_head=True, progress=progress)
    return load(copy, device=where, tokenizer=False, repack_cache=False), "int8"  # a temporary copy: cache nothing


def _write_metadata(src: Path, tmp: Path, cfg, bits, group_size, sym, act_order, method, quantize_head, head_bits,
                    mse=False, head_mse=False, calibration=None, head_group_size=-1, out=None):
    qc = {"bits": bits, "group_size": group_size, "desc_act": act_order, "sym": sym, "quant_method": "gptq",
          "checkpoint_format": "gptq", "damp_percent": 0.01, "true_sequential": False, "static_groups": False}
    if quantize_head:
        head = "transformer.output_layer" if cfg.layout == "chatglm" else "lm_head"
        qc["dynamic"] = {f"+:{re.escape(head)}": {"bits": head_bits, "group_size": head_group_size}}
    name = src.resolve().name
    meta = {"method": method, "quantize_head": quantize_head, "source": name,
            "version": __import__("lowvram").__version__,
            "clip_search": "mse" if mse else "none"}  # per-group range: min-max, or the lowest-MSE shrink
    if quantize_head:
        meta["head_clip_search"] = "mse" if head_mse else "none"
    if calibration:
        meta["calibration"] = calibration
    qc_meta = dict(qc, lowvram=meta)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = qc_meta
    config["torch_dtype"] = "float16"
    (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (tmp / "quantize_config.json").write_text(json.dumps(qc_meta, indent=2))
    for f in COPY_FILES + tuple(p.name for p in src.glob("*.py")):
        if (src / f).exists():
            shutil.copy2(src / f, tmp / f)
    (tmp / "README.md").write_text(
        f"# {name} — INT{bits} {method.upper()} (GPTQ format)\n\n"
        f"Quantized by lowvram from `{name}`: every transformer-block linear to {bits} bits, "
        f"group size {group_size}, {'symmetric' if sym else 'asymmetric'}, act-order {act_order}"
        f"{f', output layer to {head_bits} bits' if quantize_head else ''}"
        f"{f' (groups of {head_group_size})' if quantize_head and head_group_size > 0 else ''}; embeddings and norms unchanged.\n"
        f"Scales: {_clip_text(mse)}"
        f"{f' (output layer: {_clip_text(head_mse)})' if quantize_head and head_mse != mse else ''}.\n"
        f"{_calib_text(calibration)}"
        f"Standard GPTQ tensors (qweight/qzeros/scales/g_idx, v1 zeros) under the original names.\n\n"
        f"    lowvram chat {out}\n")


def _calib_text(c: dict | None) -> str:
    if not c:
        return ""
    if c["data"] != "self-generated":
        return f"Calibration: {c['samples']} sequences of {c['seq_len']} tokens from `{c['data']}`.\n"
    by = "the source model" if c["sampler"] == "source" else "an INT8 round-to-nearest copy of the source model"
    return f"Calibration: {c['samples']} sequences of {c['seq_len']} tokens sampled (top-k 50) from {by}.\n"


def _clip_text(mse: bool) -> str:
    if mse:
        return ("per group, the range shrunk by the factor in 1.00, 0.99 .. 0.80 with the lowest squared "
                "round-to-nearest error (GPTQ's `mse` option)")
    return "per group, the full min-max range (absmax when symmetric)"


def quantize_arguments(p):
    p.add_argument("source", help="checkpoint directory or a known model name (e.g. chatglm3-6b)")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4, help="default: 4")
    p.add_argument("--method", choices=("rtn", "gptq"), default="rtn",
                   help="round-to-nearest (default) or GPTQ (calibrated, lower error)")
    p.add_argument("--group-size", type=int, default=128, help="columns per scale (default: 128); -1 = one per row")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric scales (default)")
    g.add_argument("--asym", dest="sym", action="store_false", help="a zero point per group")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--mse", dest="mse", action="store_true", default=None,
                   help="search each group's clipping range for the lowest squared error (default: on for 4 bits)")
    m.add_argument("--no-mse", dest="mse", action="store_false", help="plain min-max scales (default for 8 bits)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by descending Hessian diagonal")
    p.add_argument("--calib", help="calibration text (.txt), or jsonl with a 'text' field or pre-tokenized 'input_ids'; "
                   "default: sampled from the model")
    p.add_argument("--calib-samples", type=int, default=32, help="GPTQ: calibration rows (default: 32)")
    p.add_argument("--calib-seq-len", type=int, default=128, help="GPTQ: tokens per row (default: 128)")
    p.add_argument("--calib-model", choices=("auto", "source", "int8"), default="auto",
                   help="without --calib, what samples the calibration text: the source model when it fits in free "
                   "memory (auto), always the source, or an INT8 RTN copy of it (about half the memory)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"), help="GPTQ: where blocks are calibrated (default: cpu)")
    p.add_argument("--quantize-head", action="store_true", help="also quantize the output layer (by default 8-bit, one scale per row; see --head-bits, --head-group-size)")
    p.add_argument("--head-bits", type=int, choices=(4, 8), default=8, help="bits of the quantized output layer (default: 8)")
    p.add_argument("--head-group-size", type=int, default=-1,
                   help="columns per scale of the quantized output layer; -1 = one per row (default)")
    p.add_argument("-o", "--out", help="output directory (default: ./NAME-int{bits}-{method} in the current directory, NAME the source's last path part)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def quantize_main(args) -> int:
    out = args.out or f"{Path(args.source).resolve().name}-int{args.bits}-{args.method}"
    s = quantize(args.source, out, bits=args.bits, method=args.method, group_size=args.group_size, sym=args.sym,
                 act_order=args.act_order, calib=args.calib, calib_samples=args.calib_samples,
                 calib_seq_len=args.calib_seq_len, device=args.device, force=args.force,
                 quantize_head=args.quantize_head, head_bits=args.head_bits, head_group_size=args.head_group_size,
                 mse=args.mse,
                 calib_model=args.calib_model)
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        e = s["rel_error"] or {}
        print(f"wrote {s['out']}: {s['quantized_linears']} linears to int{s['bits']} ({s['method']}), "
              f"{s['size_in'] / 2**20:.1f} MiB -> {s['size_out'] / 2**20:.1f} MiB in {s['seconds']} s, "
              f"peak RSS {s['peak_rss_bytes'] / 2**30:.2f} GiB; relative weight error "
              f"min {e.get('min', 0):.4f} median {e.get('median', 0):.4f} max {e.get('max', 0):.4f}")
        if s["calibration"]:
            print(_calib_text(s["calibration"]).strip())
    return 0
