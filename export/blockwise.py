"""Blockwise weight quantization of our own, written in onnxruntime's MatMulNBits layout.

onnxruntime's quantizer rounds every block to the grid its largest weight sets (absmax). That grid is rarely the
best one: a slightly smaller scale clips one outlier but places the other 31 weights of the block on finer steps.
Here each block's scale is searched for the least squared error, weighted by how much each input channel matters
(the mean square of the activations that multiply it, measured on the calibration text), the way llama.cpp's
importance-matrix quantization does. By default the weights stay symmetric with the format's fixed zero point (8 for
4 bits, 128 for 8), so the fast int4/int8 kernels run unchanged on x86 and on ARM (KleidiAI takes symmetric weights
only); asymmetric=True gives each block an integer zero point as well (uint4 zero points keep x86's fast kernel).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Scale candidates around absmax: x/scale spans -(nmax + STEP * i) .. for i in -STEPS..STEPS (llama.cpp's
# make_qx_quants search, rmse_type 1), each refined by least squares and two rounds of re-rounding.
STEPS, STEP, REFINE = 9, 0.1, 2


@dataclass(frozen=True)
class Quantized:
    packed: np.ndarray  # uint8 [N, blocks, block * bits / 8]: MatMulNBits' B (low nibble first for 4 bits)
    scales: np.ndarray  # float32 [N, blocks]: w = (q - zero point) * scale
    bits: int
    block_size: int
    zero_points: np.ndarray | None = None  # uint8 [N, blocks] levels; None: the format's fixed 2^(bits-1)

    def dequantized(self) -> np.ndarray:
        """The [K, N] float32 weight that MatMulNBits computes with (for tests and error figures)."""
        zero = 2 ** (self.bits - 1) if self.zero_points is None else self.zero_points[:, :, None].astype(np.float32)
        q = unpack(self.packed, self.bits).astype(np.float32) - zero
        w = q * self.scales[:, :, None]
        return w.reshape(w.shape[0], -1).T

    def packed_zero_points(self) -> np.ndarray:
        """MatMulNBits' uint8 zero points, flat: per output row, packed as the levels are (a 4-bit row of odd
        block count padded to whole bytes)."""
        zero = self.zero_points
        if self.bits == 4 and zero.shape[1] % 2:
            zero = np.pad(zero, ((0, 0), (0, 1)))
        return np.ascontiguousarray(pack(zero, self.bits)).reshape(-1)


def quantize(weight: np.ndarray, bits: int, block_size: int, importance: np.ndarray | None = None,
             search: bool = True, asymmetric: bool = False) -> Quantized:
    """weight: a MatMul's [K, N] float32 B. importance: [K] non-negative weights of the squared error per input
    channel (None: the weight's own magnitude). search=False gives onnxruntime's absmax rounding, bit for bit."""
    k, n = weight.shape
    if k % block_size:
        raise ValueError(f"K={k} is not a multiple of the block size {block_size}")
    blocks = np.ascontiguousarray(weight.T, dtype=np.float32).reshape(n, k // block_size, block_size)
    nmax = 2 ** (bits - 1)
    if search:
        q, scales, low = _search(blocks, nmax, _importance(blocks, importance, block_size), asymmetric)
    else:
        q, scales = _absmax(blocks, nmax)
        low = np.full(scales.shape, -nmax, np.float32)
    return _stored(q, scales, low, bits, block_size, asymmetric)


def _stored(q: np.ndarray, scales: np.ndarray, low: np.ndarray, bits: int, block_size: int,
            asymmetric: bool) -> Quantized:
    """Signed levels q (each block's between low and low + 2^bits - 1) as MatMulNBits' unsigned levels and zero
    points (-low)."""
    levels = (q - low[..., None]).astype(np.uint8)
    zero_points = (-low).astype(np.uint8) if asymmetric else None
    return Quantized(pack(levels, bits), scales.astype(np.float32), bits, block_size, zero_points)


def quantize_compensated(weight: np.ndarray, bits: int, block_size: int, gram: np.ndarray,
                         damping: float = 0.01, asymmetric: bool = False) -> Quantized:
    """GPTQ (Frantar et al., 2022): input channels are rounded one at a time and each one's rounding error,
    weighted by the inverse of the calibration activations' Gram matrix X^T X / T, is pushed onto the channels
    not yet rounded, so that the layer's output on that data, not its weights, stays as close as possible. Each
    block's scale is searched (as `quantize` does) on the weights as they stand when the block is reached."""
    k, n = weight.shape
    if k % block_size:
        raise ValueError(f"K={k} is not a multiple of the block size {block_size}")
    nmax = 2 ** (bits - 1)
    w = np.array(weight.T, dtype=np.float64)  # [N, K]: one row per output, rounded along K
    h = np.array(gram, dtype=np.float64)
    dead = np.diag(h) == 0  # a channel the text never lit: its weights cannot matter to the data
    h[dead, dead] = 1
    h += np.eye(k) * damping * np.mean(np.diag(h))
    # Upper Cholesky factor U of H^-1 = U^T U: row i holds how channel i's error spreads to the channels after it.
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    energy = np.diag(gram).astype(np.float64)
    levels = np.empty((n, k), np.float32)
    scales = np.empty((n, k // block_size), np.float32)
    lows = np.empty((n, k // block_size), np.float32)
    for start in range(0, k, block_size):  # one block of channels at a time; the rest updated lazily
        end = start + block_size
        block = w[:, start:end]
        _, scale, low = _search(block[:, None, :].astype(np.float32), nmax, np.broadcast_to(
            (energy[start:end] + 0.01 * energy.mean() + 1e-12).astype(np.float32), (n, 1, block_size)), asymmetric)
        scales[:, start // block_size], lows[:, start // block_size] = scale[:, 0], low[:, 0]
        safe, low = np.where(scale[:, 0] == 0, 1, scale[:, 0]), low[:, 0]
        errors = np.empty((n, block_size))
        for i in range(block_size):
            col = start + i
            level = np.clip(np.round(block[:, i] / safe), low, low + 2 * nmax - 1)
            levels[:, col] = level
            errors[:, i] = (block[:, i] - level * scale[:, 0]) / hinv[col, col]
            block[:, i:] -= errors[:, i:i + 1] * hinv[col, col:end][None, :]
        w[:, end:] -= errors @ hinv[start:end, end:]
    return _stored(levels.reshape(n, k // block_size, block_size), scales, lows, bits, block_size, asymmetric)


def _absmax(blocks: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime's symmetric rounding: the weight of largest magnitude maps to -nmax (the scale takes its sign)."""
    signed_max = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
    scales = signed_max / -nmax
    inverse = np.where(scales == 0, 0, 1 / np.where(scales == 0, 1, scales))
    q = np.clip(np.round(blocks * inverse[..., None]), -nmax, nmax - 1)
    return q, scales


def _importance(blocks: np.ndarray, importance: np.ndarray | None, block_size: int) -> np.ndarray:
    """Per-weight error weights, [N, blocks, block]: the channel's activation energy where measured (with a floor,
    so that a channel the calibration text never lit still counts a little), else the weight's own square."""
    if importance is None:
        return blocks * blocks + (blocks * blocks).mean(-1, keepdims=True)
    channel = np.asarray(importance, np.float64)
    channel = (channel + 0.01 * channel.mean() + 1e-12).astype(np.float32)
    return np.broadcast_to(channel.reshape(1, -1, block_size), blocks.shape)


def _search(blocks: np.ndarray, nmax: int, weights: np.ndarray,
            asymmetric: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(signed levels, scale, lowest level) of least weighted squared error per block: symmetric candidates around
    absmax (lowest level -nmax), and with asymmetric=True also min-max candidates with an integer zero point."""
    q, scale = _search_symmetric(blocks, nmax, weights)
    low = np.full(scale.shape, -nmax, np.float32)
    if not asymmetric:
        return q, scale, low
    err = _error(blocks, weights, q, scale)
    span = 2 * nmax - 1
    lo, hi = blocks.min(-1), blocks.max(-1)
    width = np.where(hi > lo, hi - lo, 1)
    for i in range(-STEPS, STEPS + 1):  # the range spread over span + STEP * i steps, then refined
        s = width / (span + STEP * i)
        for _ in range(REFINE + 1):
            zero = np.clip(np.round(-lo / s), 0, span)
            cand_q = np.clip(np.round(blocks / s[..., None]), -zero[..., None], (span - zero)[..., None])
            s = _fit(blocks, weights, cand_q)
            s = np.where(s > 0, s, width / span)
        cand_err = _error(blocks, weights, cand_q, s)
        better = cand_err < err
        err, scale = np.where(better, cand_err, err), np.where(better, s, scale)
        q, low = np.where(better[..., None], cand_q, q), np.where(better, -zero, low)
    return q, scale, low.astype(np.float32)


def _search_symmetric(blocks: np.ndarray, nmax: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The scale of least weighted squared error per block, over candidates around absmax."""
    best_q, best_scale = _absmax(blocks, nmax)
    best_err = _error(blocks, weights, best_q, best_scale)
    signed_max = -nmax * best_scale
    safe_max = np.where(signed_max == 0, 1, signed_max)
    for i in range(-STEPS, STEPS + 1):
        inverse = -(nmax + STEP * i) / safe_max
        q = np.clip(np.round(blocks * inverse[..., None]), -nmax, nmax - 1)
        for _ in range(REFINE):
            scale = _fit(blocks, weights, q)
            safe = np.where(scale == 0, 1, scale)
            q = np.clip(np.round(blocks / safe[..., None]), -nmax, nmax - 1)
        scale = _fit(blocks, weights, q)
        err = _error(blocks, weights, q, scale)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_q = np.where(better[..., None], q, best_q)
    return best_q, best_scale


def _fit(blocks: np.ndarray, weights: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Least-squares scale for fixed integer levels: sum(w x q) / sum(w q^2)."""
    num = (weights * blocks * q).sum(-1)
    den = (weights * q * q).sum(-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1), 0).astype(np.float32)


def _error(blocks, weights, q, scale) -> np.ndarray:
    diff = blocks - q * scale[..., None]
    return (weights * diff * diff).sum(-1)


def pack(levels: np.ndarray, bits: int) -> np.ndarray:
    """[N, blocks, block] levels 0 .. 2^bits-1 as MatMulNBits bytes: 8 bits as they are, 4 bits two per byte."""
    if bits == 8:
        return levels
    return (levels[..., 0::2] | (levels[..., 1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 0x0F, packed >> 4
    return out
