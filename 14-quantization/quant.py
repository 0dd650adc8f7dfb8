"""Weight quantisation from scratch: absmax and zero-point integers, three granularities, bit packing, and the
GGUF block formats Q8_0 / Q4_0 / Q4_1 byte for byte.

A weight matrix W (rows = output channels, cols = input channels) is cut into groups that share one scale:
- granularity "tensor": one group, the whole matrix;
- granularity "channel": one group per output row (per-output-channel);
- granularity g (an int, e.g. 32/64/128): groups of g consecutive input columns inside each row.

Symmetric (absmax):  s = max|w| / qmax,          q = clamp(round(w / s), -qmax, qmax),      w' = s * q
Asymmetric (zero-point): s = (max - min) / (2^b - 1),  z = round(-min / s),
                     q = clamp(round(w / s + z), 0, 2^b - 1),                                  w' = s * (q - z)
with qmax = 2^(b-1) - 1 (127 for int8, 7 for int4, 3 for int3, 1 for int2). Scales are stored in float16 (as GGUF does)
and the codes are computed with the stored (rounded) scale, so dequantising reproduces exactly what was meant.
Codes of b < 8 bits are packed as a little-endian bit stream (8/b per byte for 2 and 4 bits, first element in the
lowest bits; 3-bit codes straddle bytes).

GGUF blocks (llama.cpp's formats; 32 weights per block along a row):
- Q8_0: [fp16 d][32 x int8]           d = absmax / 127, q = roundf(w / d)                      34 bytes
- Q4_0: [fp16 d][16 bytes]            d = (signed max-magnitude value) / -8,
                                      q = min(15, trunc(w / d + 8.5)), nibbles j and j+16 share byte j  18 bytes
- Q4_1: [fp16 d][fp16 m][16 bytes]    d = (max - min) / 15, m = min, q = min(15, trunc((w - m) / d + 0.5))  20 bytes
computed with the same float32 operations as `gguf.quants` (itself bit-exact with ggml-quants.c).

Shapes: W (R, C) = (rows/out features, cols/in features); G groups per row; g group size.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.model import model_device

__all__ = ["QuantTensor", "quantize", "pack_bits", "unpack_bits", "QuantLinear", "GGUFTensor", "gguf_quantize",
           "gguf_dequantize", "GGUF_BLOCK_BYTES", "FloatTensor", "quantize_model", "token_nlls", "quant_error",
           "write_gguf", "fake_quant", "FakeQuantModel", "linear_inputs", "awq_search", "awq_quantize",
           "gptq_quantize", "AWQResult", "BITS", "window_metrics", "quantize_activations", "smoothquant_scales",
           "w8a8_model", "paired", "stored_state"]

BITS = (2, 3, 4, 8)                  # supported integer widths (3 bits: a bit stream straddling bytes)
GGUF_BLOCK = 32
GGUF_BLOCK_BYTES = {"Q8_0": 2 + 32, "Q4_0": 2 + 16, "Q4_1": 2 + 2 + 16}


# ---------------------------------------------------------------------------------------------- validators
def _check_weight(w, name: str = "w") -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {w.dtype}")
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (rows, cols) matrix, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} must be finite (no inf/nan)")


def _check_scheme(bits, granularity) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int, got {type(bits).__name__} {bits!r}")
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if isinstance(granularity, bool) or not isinstance(granularity, (int, str)):
        raise TypeError(f"granularity must be 'tensor', 'channel' or an int group size, got {granularity!r}")
    if isinstance(granularity, str) and granularity not in ("tensor", "channel"):
        raise ValueError(f"granularity must be 'tensor', 'channel' or an int group size, got {granularity!r}")
    if isinstance(granularity, int) and granularity < 1:
        raise ValueError(f"granularity (group size) must be >= 1, got {granularity}")


# ---------------------------------------------------------------------------------------------- bit packing
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes in [0, 2^bits) (any shape) -> 1-D uint8: a little-endian bit stream, code k in bits
    [k*bits, (k+1)*bits), so 8/bits codes per byte with the first in the low bits for 2/4/8 bits, and 3-bit codes
    straddling bytes. The stream is padded with zero bits to whole bytes; bits=8 returns the codes as uint8.
    """
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    flat = codes.reshape(-1).to(torch.int32).cpu()                       # numpy packs the bits: on the CPU
    if flat.numel() and (flat.min() < 0 or flat.max() >= 2 ** bits):
        raise ValueError(f"codes must lie in [0, {2 ** bits}) for {bits}-bit packing")
    planes = ((flat[:, None] >> torch.arange(bits, dtype=torch.int32)) & 1).to(torch.uint8)   # (n, bits) LSB first
    return torch.from_numpy(np.packbits(planes.reshape(-1).numpy(), bitorder="little")).to(codes.device)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: 1-D uint8 -> the first `n` codes as int32 (1-D)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if n * bits > packed.numel() * 8:
        raise ValueError(f"n = {n} codes do not fit in {packed.numel()} bytes of {bits}-bit codes")
    stream = np.unpackbits(packed.contiguous().cpu().numpy(), bitorder="little")[: n * bits].reshape(n, bits)
    codes = (torch.from_numpy(stream.astype(np.int32)) << torch.arange(bits, dtype=torch.int32)).sum(dim=1,
                                                                                                   dtype=torch.int32)
    return codes.to(packed.device)


# ---------------------------------------------------------------------------------------------- our integers
def _groups(w: torch.Tensor, granularity) -> torch.Tensor:
    """(R, C) -> (R', G, g) float32 groups. When g does not divide C, each row's last group is shorter: for the
    computation it is padded with copies of that group's own first value (its min, max and absmax unchanged),
    and the padding is never stored."""
    R, C = w.shape
    w = w.float()
    if granularity == "tensor":
        return w.reshape(1, 1, R * C)
    if granularity == "channel":
        return w.reshape(R, 1, C)
    g = granularity
    pad = (-C) % g
    if pad:
        first = C - C % g                                                       # start of the partial group
        w = torch.cat([w, w[:, first:first + 1].expand(R, pad)], dim=1)         # its own value: neutral
    return w.reshape(R, (C + pad) // g, g)


@dataclass
class QuantTensor:
    """A quantised (R, C) matrix: packed codes + one float16 scale (and uint8 zero-point) per group.

    `packed`: 1-D uint8 of the R*C codes in row-major order (symmetric codes stored offset by 2^(b-1), i.e.
    unsigned); `scale`, `zero`: (R', G, 1) as in `_groups` (a row's last group may be shorter than g).
    """
    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    shape: tuple[int, int]
    bits: int
    granularity: object
    symmetric: bool

    def codes(self) -> torch.Tensor:
        """Integer codes (R, C): symmetric in [-qmax, qmax], zero-point in [0, 2^b - 1]."""
        R, C = self.shape
        q = unpack_bits(self.packed, self.bits, R * C).view(R, C)
        return q - 2 ** (self.bits - 1) if self.symmetric else q

    def per_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-group tensor (R', G, 1) to one value per weight (R, C)."""
        R, C = self.shape
        if self.granularity == "tensor":
            return t.reshape(1, 1).expand(R, C)
        if self.granularity == "channel":
            return t.reshape(R, 1).expand(R, C)
        return t.reshape(R, -1).repeat_interleave(self.granularity, dim=1)[:, :C]

    def dequantize(self) -> torch.Tensor:
        """float32 (R, C): s * q (symmetric) or s * (q - z) (zero-point)."""
        q, s = self.codes().float(), self.per_weight(self.scale.float())
        return s * q if self.symmetric else s * (q - self.per_weight(self.zero.float()))

    @property
    def nbytes(self) -> int:
        """Bytes of storage: packed codes + scales (+ zero-points)."""
        extra = 0 if self.zero is None else self.zero.numel() * self.zero.element_size()
        return self.packed.numel() + self.scale.numel() * self.scale.element_size() + extra


def _fma(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """float32 x * y + z with one rounding (a fused multiply-add): the float32 product is exact in float64."""
    return (x.double() * y.double() + z.double()).float()


def quantize(w: torch.Tensor, bits: int = 8, granularity="channel", symmetric: bool = True) -> QuantTensor:
    """Quantise a 2-D weight (R, C) to `bits` with one scale per group (see the module docstring).

    Round-to-nearest with ties to even, computed as PyTorch's CPU quantisers do (`torch.quantize_per_channel`,
    `torch.quantize_per_tensor`): round(w * (1/s) + z) with the float32 reciprocal taken first and the
    zero-point added by a fused multiply-add before rounding. The order only matters for weights within float32
    noise of a tie, but it makes our codes equal to PyTorch's bit for bit. An all-zero group
    gets scale 1 (codes 0) so nothing divides by zero.
    """
    _check_weight(w)
    _check_scheme(bits, granularity)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    x = _groups(w, granularity)                                                 # (R', G, g)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (x.abs().amax(dim=-1, keepdim=True) / qmax).half()              # stored in fp16
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.round(x * (1 / scale.float())).clamp(-qmax, qmax)           # times 1/s, as PyTorch does
        zero, q = None, q + 2 ** (bits - 1)                                    # offset binary: unsigned
    else:
        qmax = 2 ** bits - 1
        lo = x.amin(dim=-1, keepdim=True).clamp(max=0)                          # keep 0 exactly representable
        hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = ((hi - lo) / qmax).half()
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.round(-lo / scale.float()).clamp(0, qmax)
        q = torch.round(_fma(x, 1 / scale.float(), zero)).clamp(0, qmax)      # z added before rounding
        zero = zero.to(torch.uint8)
    R, C = w.shape
    packed = pack_bits(q.to(torch.int32).reshape(R, -1)[:, :C], bits)           # real weights only, no padding
    return QuantTensor(packed, scale, zero, tuple(w.shape), bits, granularity, symmetric)


class QuantLinear(nn.Module):
    """A bias-free linear layer that stores its weight quantised and computes y = x @ dequantize(W)^T.

    Dequantise-then-matmul: memory is saved (packed codes), compute is still float32. x (..., C) -> (..., R).
    """

    def __init__(self, qweight):
        super().__init__()
        if not isinstance(qweight, (QuantTensor, GGUFTensor, FloatTensor)):
            raise TypeError(f"qweight must be a QuantTensor, GGUFTensor or FloatTensor, got {type(qweight).__name__}")
        self.qweight = qweight
        self.out_features, self.in_features = qweight.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantizer) -> "QuantLinear":
        if not isinstance(linear, nn.Linear) or linear.bias is not None:
            raise TypeError("linear must be an nn.Linear without bias")
        return cls(quantizer(linear.weight.detach()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight.dequantize().to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bytes={self.qweight.nbytes}"


# ---------------------------------------------------------------------------------------------- GGUF blocks
def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (ties away from zero), written with the same float32 operations as gguf's np_roundf."""
    a = x.abs()
    fl = torch.floor(a)
    return torch.sign(x) * (fl + torch.floor(2 * (a - fl)))


def _blocks(w: torch.Tensor) -> torch.Tensor:
    _check_weight(w)
    if w.shape[1] % GGUF_BLOCK:
        raise ValueError(f"GGUF blocks need cols divisible by {GGUF_BLOCK}, got shape {tuple(w.shape)}")
    return w.float().reshape(-1, GGUF_BLOCK)                                      # (R * C/32, 32)


def _half_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.half().view(torch.uint8)                                            # (n, 1) fp16 -> (n, 2) bytes


def gguf_quantize(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """(R, C) float -> (R, C/32 * block_bytes) uint8, the bytes of llama.cpp's Q8_0 / Q4_0 / Q4_1 blocks."""
    if qtype not in GGUF_BLOCK_BYTES:
        raise ValueError(f"qtype must be one of {sorted(GGUF_BLOCK_BYTES)}, got {qtype!r}")
    b = _blocks(w)                                                               # (n, 32)
    R = w.shape[0]
    if qtype == "Q8_0":
        d = b.abs().amax(dim=1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        qs = _roundf(b * inv).to(torch.int8).view(torch.uint8)
        out = torch.cat([_half_bytes(d), qs], dim=1)
    else:
        if qtype == "Q4_0":
            imax = b.abs().argmax(dim=1, keepdim=True)                           # first index of max |w|
            d = b.gather(1, imax) / -8                                           # signed: max magnitude -> -8
            inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
            q = torch.trunc(b * inv + 8.5)
            head = _half_bytes(d)
        else:
            lo, hi = b.amin(dim=1, keepdim=True), b.amax(dim=1, keepdim=True)
            d = (hi - lo) / 15
            inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
            q = torch.trunc((b - lo) * inv + 0.5)
            head = torch.cat([_half_bytes(d), _half_bytes(lo)], dim=1)
        q = q.to(torch.uint8).clamp(0, 15)                                       # (n, 32)
        qs = q[:, :16] | (q[:, 16:] << 4)                                        # weight j and j+16 share byte j
        out = torch.cat([head, qs], dim=1)
    return out.reshape(R, -1)


def gguf_dequantize(data: torch.Tensor, qtype: str, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of `gguf_quantize`: uint8 blocks -> float32 (R, C)."""
    if qtype not in GGUF_BLOCK_BYTES:
        raise ValueError(f"qtype must be one of {sorted(GGUF_BLOCK_BYTES)}, got {qtype!r}")
    R, C = shape
    if data.dtype != torch.uint8 or data.numel() != R * C // GGUF_BLOCK * GGUF_BLOCK_BYTES[qtype]:
        raise ValueError(f"data must be uint8 with {R * C // GGUF_BLOCK * GGUF_BLOCK_BYTES[qtype]} bytes for "
                         f"{qtype} {shape}, got {data.dtype} with {data.numel()}")
    b = data.reshape(-1, GGUF_BLOCK_BYTES[qtype])
    d = b[:, :2].contiguous().view(torch.float16).float()                        # (n, 1)
    if qtype == "Q8_0":
        w = d * b[:, 2:].contiguous().view(torch.int8).float()
    else:
        qs = b[:, -16:]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()                       # (n, 32)
        if qtype == "Q4_0":
            w = d * (q - 8)
        else:
            m = b[:, 2:4].contiguous().view(torch.float16).float()
            w = d * q + m
    return w.reshape(R, C)


@dataclass
class GGUFTensor:
    """A weight stored as GGUF blocks; same interface as `QuantTensor` (`dequantize()`, `nbytes`, `shape`)."""
    data: torch.Tensor
    qtype: str
    shape: tuple[int, int]

    @classmethod
    def from_float(cls, w: torch.Tensor, qtype: str) -> "GGUFTensor":
        return cls(gguf_quantize(w, qtype), qtype, tuple(w.shape))

    def dequantize(self) -> torch.Tensor:
        return gguf_dequantize(self.data, self.qtype, self.shape)

    @property
    def nbytes(self) -> int:
        return self.data.numel()


@dataclass
class FloatTensor:
    """A weight kept in a float dtype (float32, bfloat16, float16): the unquantised baselines."""
    data: torch.Tensor

    @classmethod
    def from_float(cls, w: torch.Tensor, dtype: torch.dtype = torch.float32) -> "FloatTensor":
        return cls(w.detach().to(dtype).clone())

    @property
    def shape(self):
        return tuple(self.data.shape)

    def dequantize(self) -> torch.Tensor:
        return self.data.float()

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


# ---------------------------------------------------------------------------------------------- .gguf files
def _rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's q/k row order (RoPE pairs (i, i + D/2)) -> llama.cpp's (pairs (2i, 2i + 1)), as convert_hf_to_gguf.py."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path, qtype: str) -> int:
    """Write a shared Llama-shaped `GPT` as a llama.cpp `.gguf` file: every 2-D weight as our `qtype` blocks,
    norm gains float32. Returns the bytes of tensor data written. `transformers` loads it with
    `AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)` (and dequantises it to float).
    """
    import gguf
    import numpy as np

    from shared.model import GPT

    if not isinstance(model, GPT) or not model.cfg.tie_embeddings or model.cfg.pos != "rope":
        raise TypeError("model must be a shared.model.GPT with RoPE and tied embeddings")
    if qtype not in GGUF_BLOCK_BYTES:
        raise ValueError(f"qtype must be one of {sorted(GGUF_BLOCK_BYTES)}, got {qtype!r}")
    cfg = model.cfg
    names = {"tok_emb.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}   # tied: no output.weight
    for i in range(cfg.n_layer):
        for ours, theirs in [("norm1", "attn_norm"), ("norm2", "ffn_norm"), ("attn.q_proj", "attn_q"),
                             ("attn.k_proj", "attn_k"), ("attn.v_proj", "attn_v"), ("attn.o_proj", "attn_output"),
                             ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")]:
            names[f"blocks.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}"))
    state, written = model.state_dict(), 0
    for key, name in names.items():
        t = state[key].detach().float().cpu()
        if key.endswith("q_proj.weight"):
            t = _rope_permute(t, cfg.n_head)
        elif key.endswith("k_proj.weight"):
            t = _rope_permute(t, cfg.n_kv_head)
        data = (gguf_quantize(t, qtype) if t.dim() == 2 else t).numpy()
        writer.add_tensor(name, data, raw_dtype=getattr(gguf.GGMLQuantizationType, qtype) if t.dim() == 2 else None)
        written += data.nbytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


# ---------------------------------------------------------------------------------------------- whole model
def quantize_model(model: nn.Module, quantizer) -> tuple[nn.Module, int]:
    """A copy of `model` whose every 2-D weight went through `quantizer(w) -> QuantTensor/GGUFTensor/...`.

    The copy holds the dequantised float32 weights (fake quantisation: same numbers a `QuantLinear` computes
    with); returns (copy, bytes), bytes = the quantised storage of every 2-D weight (a tied weight once) + the
    other parameters (norm gains) in float32.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(quantizer):
        raise TypeError("quantizer must be callable: w (R, C) -> object with dequantize() and nbytes")
    out = copy.deepcopy(model)
    total = 0
    with torch.no_grad():
        for _, p in out.named_parameters():                                     # tied weights appear once
            if p.dim() == 2:
                qw = quantizer(p.detach())
                p.copy_(qw.dequantize().to(p.dtype))
                total += qw.nbytes
            else:
                total += p.numel() * 4
    return out, total


def stored_state(model: nn.Module, quantizer) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint of `model` quantised by `quantizer` stores, as a flat {name: CPU tensor} dict that
    `safetensors.torch.save_file` writes: for a `QuantTensor` "<name>.codes" (packed uint8), "<name>.scale"
    (float16) and "<name>.zero" (uint8, zero-point schemes); for a `GGUFTensor` "<name>.blocks" (uint8 GGUF blocks);
    for a `FloatTensor` "<name>" in its dtype; every other parameter (norm gains) float32; a tied weight once.
    Their bytes add up to the count `quantize_model` returns (the file adds only safetensors' JSON header)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(quantizer):
        raise TypeError("quantizer must be callable: w (R, C) -> QuantTensor, GGUFTensor or FloatTensor")
    state = {}
    for name, p in model.named_parameters():                                    # tied weights appear once
        if p.dim() != 2:
            state[name] = p.detach().float()
            continue
        qw = quantizer(p.detach())
        if isinstance(qw, QuantTensor):
            state[f"{name}.codes"], state[f"{name}.scale"] = qw.packed, qw.scale
            if qw.zero is not None:
                state[f"{name}.zero"] = qw.zero
        elif isinstance(qw, GGUFTensor):
            state[f"{name}.blocks"] = qw.data
        elif isinstance(qw, FloatTensor):
            state[name] = qw.data
        else:
            raise TypeError(f"quantizer returned {type(qw).__name__}: expected QuantTensor, GGUFTensor or FloatTensor")
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def quant_error(w: torch.Tensor, qw) -> float:
    """Relative Frobenius error ||W - W'|| / ||W|| of a quantised weight."""
    return float((w.float() - qw.dequantize()).norm() / w.float().norm())


@torch.no_grad()
def token_nlls(model: nn.Module, tokens: torch.Tensor, seq_len: int, batch_size: int = 32) -> torch.Tensor:
    """Per-token loss (nats) over ALL of a 1-D stream, windows of `seq_len` as in `shared.train.evaluate_stream`.

    Returns (N_windows, seq_len) for the full windows (the stream's short tail is dropped): the rows are the
    units for a paired comparison of two models on the same text.
    """
    if tokens.dim() != 1 or len(tokens) < seq_len + 1:
        raise ValueError(f"tokens must be 1-D with >= seq_len + 1 entries, got shape {tuple(tokens.shape)}")
    model.eval()
    n_full = (len(tokens) - 1) // seq_len
    tokens = tokens.to(model_device(model))
    x_all = tokens[: n_full * seq_len].view(n_full, seq_len)
    y_all = tokens[1: n_full * seq_len + 1].view(n_full, seq_len)
    out = []
    for i in range(0, n_full, batch_size):
        logits = model(x_all[i:i + batch_size])[0]                               # (B, T, V)
        out.append(F.cross_entropy(logits.flatten(0, 1).float(), y_all[i:i + batch_size].flatten(),
                                   reduction="none").view(-1, seq_len))
    return torch.cat(out).cpu()


class LogitsModule(nn.Module):
    """Wrap a callable `ids (B, T) int64 -> logits (B, T, V)` (an ONNX Runtime session, a 🤗 model) so that
    `token_nlls` scores it like a shared GPT: `forward` returns a 1-tuple `(logits,)` as float32 torch tensor."""

    def __init__(self, fn):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn

    @torch.no_grad()
    def forward(self, idx: torch.Tensor):
        out = self.fn(idx)
        out = getattr(out, "logits", out)
        return (torch.as_tensor(out).float(),)


def ort_logits(session, input_name: str = "input_ids"):
    """ids (B, T) -> logits of an onnxruntime InferenceSession whose first output is the logits."""
    return lambda idx: torch.from_numpy(session.run(None, {input_name: idx.cpu().numpy().astype(np.int64)})[0])


def _plain_tensors(t: torch.Tensor):
    """The plain tensors that hold a tensor's data: itself, or the inner tensors of a tensor subclass that
    stores quantised data (torchao's `qdata`, `scale`, `zero_point`, via `__tensor_flatten__`)."""
    if type(t) is not torch.Tensor and type(t) is not nn.Parameter and hasattr(t, "__tensor_flatten__"):
        for name in t.__tensor_flatten__()[0]:
            yield from _plain_tensors(getattr(t, name))
    else:
        yield t


def stored_bytes(module: nn.Module) -> int:
    """Bytes of a module's state_dict (parameters, buffers and any quantisation state saved with it), every
    storage counted once (tied weights are not double-counted); a tensor subclass (torchao) counts the plain
    tensors it is made of."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    seen, total = set(), 0
    for v in module.state_dict().values():
        if not torch.is_tensor(v):
            continue
        for t in _plain_tensors(v):
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def codebook_quantize(w: torch.Tensor, code: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Blockwise codebook quantisation as bitsandbytes defines NF4/FP4, dequantised: the weight is flattened
    (row-major), cut into blocks of `blocksize`, each block divided by its absmax, each value replaced by the
    nearest level of `code` (16 levels in [-1, 1]) and multiplied back. Returns a float32 tensor of w's shape."""
    if not torch.is_tensor(w) or not w.is_floating_point():
        raise TypeError("w must be a floating-point tensor")
    if not torch.is_tensor(code) or code.dim() != 1 or code.numel() < 2:
        raise ValueError("code must be a 1-D tensor of at least 2 levels")
    if not isinstance(blocksize, int) or blocksize < 1 or w.numel() % blocksize:
        raise ValueError(f"blocksize must be a positive int dividing w.numel()={w.numel()}, got {blocksize}")
    b = w.detach().float().flatten().view(-1, blocksize)
    absmax = b.abs().amax(dim=1, keepdim=True)
    scaled = b / absmax.clamp_min(torch.finfo(torch.float32).tiny)
    idx = (scaled[..., None] - code.float()).abs().argmin(dim=-1)
    return (code.float()[idx] * absmax).view(w.shape)


def input_channel_absmax(model: nn.Module, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per input channel, max |x| over every token of `idx` (B, T) at the input of each nn.Linear of `model`:
    {module name: (in_features,)}. The activation-side view of quantisation: a per-tensor activation scale is set
    by the largest channel, so max / median of these says how many bits the typical channel loses."""
    return {name: x.abs().amax(dim=0) for name, x in linear_inputs(model, idx).items()}


# ---------------------------------------------------------------------------------------------- QAT
class _FakeQuantSTE(torch.autograd.Function):
    """Forward: the dequantised weight. Backward: the straight-through estimator, d w'/d w = 1 where w lies inside
    the quantiser's range (|w| <= (qmax + 1/2) s: the clamp does not bind) and 0 where it was clipped (round()
    itself has zero gradient almost everywhere: the STE pretends it is the identity)."""

    @staticmethod
    def forward(ctx, w, deq, inside):
        ctx.save_for_backward(inside)
        return deq

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


def fake_quant(w: torch.Tensor, bits: int = 4, granularity="channel", clip: float = 1.0) -> torch.Tensor:
    """Quantise-dequantise `w` (R, C) symmetrically, differentiable by the straight-through estimator.

    The scale is `clip` * absmax / qmax per group, stored in float16 as `quantize` does; with clip = 1 the value
    equals `quantize(w, bits, granularity).dequantize()` and every weight is inside the range (gradient = identity).
    clip < 1 clips the largest weights to +-qmax s (those beyond (qmax + 1/2) s), and they get zero gradient.
    Returns float32 (R, C).
    """
    _check_weight(w)
    _check_scheme(bits, granularity)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip <= 1:
        raise ValueError(f"clip must be a number in (0, 1], got {clip!r}")
    R, C = w.shape
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        x = _groups(w.detach(), granularity)                                    # (R', G, g)
        scale = (clip * x.abs().amax(dim=-1, keepdim=True) / qmax).half()
        scale = torch.where(scale == 0, torch.ones_like(scale), scale).float()
        deq = torch.round(x * (1 / scale)).clamp(-qmax, qmax) * scale
        inside = (x.abs() * (1 / scale) <= qmax + 0.5).float()                  # where the clamp does not bind
        deq, inside = (t.reshape(R, -1)[:, :C] for t in (deq, inside))          # drop a partial group's padding
    return _FakeQuantSTE.apply(w.float(), deq, inside)


class FakeQuantModel(nn.Module):
    """Quantisation-aware training wrapper: `forward` runs `model` with every 2-D weight replaced by
    `fake_quant(w, bits, granularity)` (a tied weight once, `torch.func.functional_call`), except the parameters
    named in `keep` (left float, e.g. an embedding stored at higher precision); the float weights stay
    the trained parameters, so an optimiser over `self.parameters()` updates them through the STE."""

    def __init__(self, model: nn.Module, bits: int = 4, granularity="channel", keep=()):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        _check_scheme(bits, granularity)
        names = {n for n, _ in model.named_parameters()}
        if isinstance(keep, str) or not set(keep) <= names:
            raise ValueError(f"keep must be a collection of parameter names of the model, got {keep!r}")
        self.model, self.bits, self.granularity, self.keep = model, bits, granularity, set(keep)

    def forward(self, *args, **kwargs):
        params = {n: fake_quant(p, self.bits, self.granularity) if p.dim() == 2 and n not in self.keep else p
                  for n, p in self.model.named_parameters()}
        return torch.func.functional_call(self.model, params, args, kwargs)


# ---------------------------------------------------------------------------------------------- AWQ / GPTQ
def linear_inputs(model: nn.Module, idx: torch.Tensor, names=None) -> dict[str, torch.Tensor]:
    """The inputs of every nn.Linear (or of those in `names`) of `model` on the tokens `idx` (B, T):
    {module name: (B*T, in_features) float32}: calibration activations for AWQ and GPTQ."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
        raise TypeError("idx must be a (B, T) tensor of token ids (torch.long)")
    seen: dict[str, torch.Tensor] = {}
    todo = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and (names is None or n in names)]
    if not todo:
        raise ValueError("model has no nn.Linear layer to observe (check names)")

    def hook(name):
        def record(module, inputs, output):
            seen[name] = inputs[0].detach().float().flatten(0, -2)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in todo]
    try:
        with torch.no_grad():
            model(idx.to(model_device(model)))
    finally:
        for h in handles:
            h.remove()
    return seen


def _check_calibration(w, x) -> None:
    _check_weight(w)
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != w.shape[1] or x.shape[0] == 0:
        raise ValueError(f"x must be (N, C={w.shape[1]}) calibration inputs, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")


def awq_quantize(w: torch.Tensor, s: torch.Tensor, quantizer) -> torch.Tensor:
    """W' = Q(W diag(s)) diag(s)^-1: scale input channel c of W up by s_c before quantising and divide it back
    after (at inference the 1/s folds into the op that produces x: a norm gain or the previous projection).
    A channel with s_c > 1 gets a relatively finer grid. w (R, C), s (C,) > 0 -> float32 (R, C)."""
    _check_weight(w)
    if not isinstance(s, torch.Tensor) or s.shape != (w.shape[1],) or not bool((s > 0).all()):
        raise ValueError(f"s must be a positive ({w.shape[1]},) tensor of per-input-channel scales")
    return quantizer(w.float() * s).dequantize() / s


@dataclass
class AWQResult:
    alpha: float                 # the chosen exponent
    scale: torch.Tensor          # (C,) per-input-channel scales s = a^alpha (normalised)
    errors: list[float]          # mean squared output error ||x W^T - x W'^T||^2 / N for each alpha of the grid
    alphas: list[float]


def awq_search(w: torch.Tensor, x: torch.Tensor, quantizer, alphas=tuple(i / 10 for i in range(11))) -> AWQResult:
    """AWQ's scale search (Lin et al. 2023) for one linear layer: s = a^alpha with a_c = mean |x_c| over the
    calibration tokens (the channel's typical input magnitude: large = salient), normalised so that
    sqrt(max s * min s) = 1 (as AutoAWQ does); pick the alpha of the grid whose quantised layer best reproduces
    the float layer's output on x. alpha = 0 is plain round-to-nearest (s = 1).
    w (R, C), x (N, C) calibration inputs, quantizer(w) -> object with dequantize()."""
    _check_calibration(w, x)
    if not alphas or any(not 0 <= a <= 1 for a in alphas):
        raise ValueError(f"alphas must be a non-empty grid of values in [0, 1], got {alphas!r}")
    w, x = w.float(), x.float()
    a = x.abs().mean(dim=0).clamp_min(1e-8)                                    # (C,)
    ref = x @ w.T                                                              # (N, R)
    best, errors = None, []
    for alpha in alphas:
        s = a ** alpha
        s = s / (s.max() * s.min()).sqrt()
        err = float(((x @ awq_quantize(w, s, quantizer).T - ref) ** 2).sum(dim=1).mean())
        errors.append(err)
        if best is None or err < best[1]:
            best = (alpha, err, s)
    return AWQResult(best[0], best[2], errors, list(alphas))


def gptq_quantize(w: torch.Tensor, x: torch.Tensor, bits: int = 4, group: int = 128,
                  damp: float = 0.01) -> torch.Tensor:
    """GPTQ (Frantar et al. 2022) for one linear layer, symmetric `bits` with one float16 scale per `group` input
    columns (the scales of a group are set from the error-updated weights when the pass reaches it).
    Columns are quantised left to right; each one's rounding error is spread over the columns not yet quantised,
    weighted by the inverse Hessian H = X^T X (+ damp * mean diag), so that x W'^T stays close to x W^T.
    With H = I nothing is spread and it is round-to-nearest. w (R, C), x (N, C) -> dequantised float32 (R, C)."""
    _check_calibration(w, x)
    _check_scheme(bits, group)
    if isinstance(group, str):
        raise ValueError(f"group must be an int group size, got {group!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or damp < 0:
        raise ValueError(f"damp must be a number >= 0, got {damp!r}")
    W = w.detach().float().clone()
    R, C = W.shape
    H = x.double().T @ x.double()                                              # (C, C)
    H += damp * H.diagonal().mean() * torch.eye(C, dtype=H.dtype, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()  # Hinv = U^T U
    qmax, out = 2 ** (bits - 1) - 1, torch.zeros_like(W)
    for i in range(C):
        if i % group == 0:
            scale = (W[:, i:i + group].abs().amax(dim=1) / qmax).half().float()   # (R,) fp16 scales
            scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.round(W[:, i] * (1 / scale)).clamp(-qmax, qmax) * scale
        out[:, i] = q
        err = (W[:, i] - q) / U[i, i]
        W[:, i + 1:] -= err[:, None] * U[i, i + 1:][None, :]
    return out


# ---------------------------------------------------------------------------------------------- sensitive metrics
@torch.no_grad()
def window_metrics(model: nn.Module, tokens: torch.Tensor, seq_len: int, ref_logp: torch.Tensor | None = None,
                   keep_logp: bool = False, batch_size: int = 32) -> dict:
    """Per-window scores of `model` on the full `seq_len` windows of a 1-D stream (as `token_nlls`).

    Returns {"nll": (N,) mean loss per window (nats/token)}; with `ref_logp` (N, T, V), the log-probabilities of a
    reference model on the same windows, also "kl": (N,) mean per-token KL(ref || model) in nats and "top1": (N,)
    fraction of positions where the two models' most likely next token agree (what llama.cpp's KLD tool reports).
    `keep_logp=True` adds "logp": (N, T, V) float32, the reference for later calls.
    """
    if tokens.dim() != 1 or len(tokens) < seq_len + 1:
        raise ValueError(f"tokens must be 1-D with >= seq_len + 1 entries, got shape {tuple(tokens.shape)}")
    model.eval()
    n_full = (len(tokens) - 1) // seq_len
    if ref_logp is not None and (not torch.is_tensor(ref_logp) or ref_logp.dim() != 3
                                 or tuple(ref_logp.shape[:2]) != (n_full, seq_len)):
        raise ValueError(f"ref_logp must be ({n_full}, {seq_len}, V), got "
                         f"{tuple(ref_logp.shape) if torch.is_tensor(ref_logp) else type(ref_logp).__name__}")
    tokens = tokens.to(model_device(model))
    x_all = tokens[: n_full * seq_len].view(n_full, seq_len)
    y_all = tokens[1: n_full * seq_len + 1].view(n_full, seq_len)
    out = {"nll": [], "kl": [], "top1": [], "logp": []}
    for i in range(0, n_full, batch_size):
        logp = F.log_softmax(model(x_all[i:i + batch_size])[0].float(), dim=-1)          # (B, T, V)
        y = y_all[i:i + batch_size].to(logp.device)                                 # a CPU runtime's logits
        out["nll"].append(-logp.gather(-1, y[:, :, None])[..., 0].mean(dim=1))
        if ref_logp is not None:
            ref = ref_logp[i:i + batch_size].to(logp.device)
            out["kl"].append((ref.exp() * (ref - logp)).sum(dim=-1).mean(dim=1))
            out["top1"].append((ref.argmax(-1) == logp.argmax(-1)).float().mean(dim=1))
        if keep_logp:
            out["logp"].append(logp)
    return {k: torch.cat(v) if k == "logp" else torch.cat(v).cpu() for k, v in out.items() if v}


def paired(a: torch.Tensor, b: torch.Tensor | None = None, scale: float = 1.0) -> tuple[float, float]:
    """Mean and standard error over windows of scale * (a - b) (or of scale * a): the paired comparison of two
    models scored on the same windows. a, b: (N,) per-window values, N >= 2."""
    if not torch.is_tensor(a) or a.dim() != 1 or a.numel() < 2:
        raise ValueError("a must be a 1-D tensor of at least 2 per-window values")
    if b is not None and (not torch.is_tensor(b) or b.shape != a.shape):
        raise ValueError(f"b must be a tensor of a's shape {tuple(a.shape)}")
    d = (a - b if b is not None else a).double() * scale
    return float(d.mean()), float(d.std() / d.numel() ** 0.5)


# ---------------------------------------------------------------------------------------------- activations (W8A8)
def quantize_activations(x: torch.Tensor, bits: int = 8, granularity: str = "token") -> torch.Tensor:
    """Symmetric fake quantisation of activations x (..., C), the scale computed on the fly (dynamic) from the
    absmax of the whole tensor ("tensor") or of each token's C values ("token"), kept in float32."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    if granularity not in ("tensor", "token"):
        raise ValueError(f"granularity must be 'tensor' or 'token', got {granularity!r}")
    qmax = 2 ** (bits - 1) - 1
    amax = x.abs().amax() if granularity == "tensor" else x.abs().amax(dim=-1, keepdim=True)
    s = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return torch.round(x / s).clamp(-qmax, qmax) * s


def smoothquant_scales(act_absmax: torch.Tensor, w: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's per-input-channel migration (Xiao et al. 2023): s_c = max|x_c|^alpha / max|W_:,c|^(1-alpha).
    x / s is easier to quantise and W diag(s) a little harder; (x / s)(W diag(s))^T = x W^T exactly.
    act_absmax (C,) from calibration text, w (R, C) -> s (C,) > 0."""
    _check_weight(w)
    if not torch.is_tensor(act_absmax) or act_absmax.shape != (w.shape[1],):
        raise ValueError(f"act_absmax must be a ({w.shape[1]},) tensor")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    tiny = 1e-5
    return (act_absmax.float().clamp_min(tiny) ** alpha / w.abs().amax(dim=0).float().clamp_min(tiny) ** (1 - alpha))


class _ActQuantHook:
    """Forward pre-hook of one nn.Linear: x -> quantize_activations(x / s) (s = 1 without smoothing)."""

    def __init__(self, bits, granularity, s=None):
        self.bits, self.granularity, self.s = bits, granularity, s

    def __call__(self, module, inputs):
        x = inputs[0] if self.s is None else inputs[0] / self.s
        return (quantize_activations(x, self.bits, self.granularity),) + tuple(inputs[1:])


def w8a8_model(model: nn.Module, weight_quantizer, act_granularity: str = "token", act_bits: int = 8,
               smooth: dict | None = None) -> nn.Module:
    """A copy of `model` in which every nn.Linear computes with fake-quantised inputs AND weights: the input of
    each linear is quantised on the fly (`quantize_activations`, per tensor or per token) and its weight goes
    through `weight_quantizer` (dequantised; a tied embedding gets the same weights, as in `quantize_model`).
    With `smooth` = {linear name: s (C,)}, that layer computes Q(x / s) Q(W diag(s))^T instead (SmoothQuant; in a
    deployment the 1/s folds into the op that makes x); a smoothed tied weight is untied."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(weight_quantizer):
        raise TypeError("weight_quantizer must be callable: w (R, C) -> object with dequantize()")
    out = copy.deepcopy(model)
    smooth = smooth or {}
    linears = {n: m for n, m in out.named_modules() if isinstance(m, nn.Linear)}
    unknown = set(smooth) - set(linears)
    if unknown:
        raise ValueError(f"smooth names no nn.Linear of the model: {sorted(unknown)}")
    with torch.no_grad():
        for n, m in linears.items():
            s = smooth.get(n)
            w = m.weight.detach().float() * (s if s is not None else 1.0)
            wq = weight_quantizer(w).dequantize().to(m.weight.dtype)
            if s is None:
                m.weight.copy_(wq)                          # in place: a tied embedding gets the same weights
            else:
                m.weight = nn.Parameter(wq, requires_grad=False)   # W diag(s) is this layer's alone: untie
            m.register_forward_pre_hook(_ActQuantHook(act_bits, act_granularity, s))
    return out
