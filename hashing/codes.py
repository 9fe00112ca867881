"""Binary codes: the one packing convention used everywhere in fedhash.

Bit k of a code lives in byte k // 8 at position k % 8, least significant bit
first (``np.packbits(..., bitorder="little")``), which is FAISS's own layout.
"""
from __future__ import annotations

import numpy as np

from .errors import CodeLengthError


MAX_BITS = 1024  # CroVCA's coding rate is a bits x bits log-determinant per batch; README: "Use", ranges


def check_bits(bits: int) -> int:
    bits = int(bits)
    if bits <= 0 or bits % 8:
        raise CodeLengthError(f"code length {bits} is not a positive multiple of 8; use 16, 32 or 64 bits")
    if bits > MAX_BITS:
        raise CodeLengthError(f"code length {bits} is above fedhash's maximum of {MAX_BITS} bits; use 16, 32 or 64 bits")
    return bits


def pack(bits01: np.ndarray) -> np.ndarray:
    """(n, K) array of 0/1 (or bool) -> (n, K/8) uint8 packed codes."""
    bits01 = np.asarray(bits01)
    if bits01.ndim != 2:
        raise CodeLengthError(f"expected a 2-D (n, bits) array, got shape {bits01.shape}")
    check_bits(bits01.shape[1])
    return np.packbits(bits01.astype(bool), axis=1, bitorder="little")


def unpack(codes: np.ndarray, bits: int | None = None) -> np.ndarray:
    """(n, K/8) uint8 -> (n, K) uint8 of 0/1."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise CodeLengthError(f"packed codes must be a 2-D uint8 array, got {codes.dtype} {codes.shape}")
    if bits is not None and codes.shape[1] * 8 != bits:
        raise CodeLengthError(f"codes are {codes.shape[1] * 8} bits, expected {bits}")
    return np.unpackbits(codes, axis=1, bitorder="little")


def logits_to_codes(logits: np.ndarray) -> np.ndarray:
    """Database codes b = 1[z > 0], packed."""
    return pack(np.asarray(logits) > 0)


def hamming(q_codes: np.ndarray, db_codes: np.ndarray) -> np.ndarray:
    """Brute-force Hamming distances (nq, ndb) between packed codes, int32 (the NumPy reference).

    With s = 2b - 1 in {-1, +1}, d(q, x) = (K - s_q . s_x) / 2: one float32 matrix
    product, exact for any K below 2**24.
    """
    q = np.asarray(q_codes)
    d = np.asarray(db_codes)
    if q.dtype != np.uint8 or d.dtype != np.uint8 or q.ndim != 2 or d.ndim != 2:
        raise CodeLengthError(f"packed codes must be 2-D uint8, got {q.dtype} {q.shape} and {d.dtype} {d.shape}")
    if q.shape[1] != d.shape[1]:
        raise CodeLengthError(f"query codes are {q.shape[1] * 8} bits, database codes {d.shape[1] * 8}")
    k = q.shape[1] * 8
    sq = unpack(q).astype(np.float32) * 2 - 1
    sd = unpack(d).astype(np.float32) * 2 - 1
    return np.rint((k - sq @ sd.T) * 0.5).astype(np.int32)


def topk_by_id(codes: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k`` by Hamming distance over packed ``codes`` stored under ``ids``, equal distances
    by ascending id: (distances int32 (nq, <=k), ids int64 (nq, <=k)), fewer columns when fewer codes."""
    ids = np.asarray(ids, np.int64)
    if not len(ids):
        return np.zeros((len(query), 0), np.int32), np.zeros((len(query), 0), np.int64)
    d = hamming(query, codes)
    order = np.lexsort((np.broadcast_to(ids, d.shape), d), axis=1)[:, :k]
    return np.take_along_axis(d, order, 1), ids[order]


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


def asymmetric_distance(q_logits: np.ndarray, db_codes: np.ndarray) -> np.ndarray:
    """Soft-query distance sum_k |sigmoid(z_qk) - b_k| (nq, ndb), float32.

    Equals sum_k s_k + sum_k b_k (1 - 2 s_k), computed as one matrix product.
    """
    s = sigmoid(q_logits)
    b = unpack(db_codes).astype(np.float32)
    if s.shape[1] != b.shape[1]:
        raise CodeLengthError(f"query logits have {s.shape[1]} bits, database codes {b.shape[1]}")
    return s.sum(1, keepdims=True) + (1.0 - 2.0 * s) @ b.T
