"""Secure aggregation's arithmetic, Flower-free: the server learns the sum of the silos' vectors and
nothing else about any one of them (SecAgg, Bonawitz et al. 2017, in its semi-honest form).

Every silo i of a run holds two X25519 key pairs: ``c`` (its share channel) and ``s`` (its masks).
- **Masks.** For each sum (a label such as ``r3-train``) silo i sends ``y_i = q(x_i) + PRG(b_i) +
  sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij)`` in the ring of 2^32 or 2^64 integers, where ``q`` is
  fixed point (:class:`Ring`), ``s_ij`` the agreed seed of i and j (X25519, then HKDF-SHA256) and ``b_i``
  a fresh self-mask seed. The pairwise masks cancel in the sum; the PRG is ChaCha20's keystream.
- **Dropouts.** At setup, silo i splits ``s_sk_i`` (its mask key) into Shamir shares, t of n
  (pycryptodome's ``Shamir`` over GF(2^128), two 16-byte halves), and sends share j to silo j
  encrypted with ChaCha20-Poly1305 under their agreed ``c`` key (the server routes ciphertexts it
  cannot read). To unmask, every silo that sent ``y`` reveals its own ``b`` and, for each silo that
  did not, its share of that silo's ``s_sk``; from t shares the server rebuilds the missing silos'
  pairwise masks and removes them. A silo's ``b`` and its ``s_sk`` are never both revealed: a silo whose
  ``y`` arrived but whose ``b`` did not (it dropped after masking) is left out of the sum, and its
  update stays hidden behind ``b``.

Fixed point (:class:`Ring`): a vector of reals in ``[-bound, bound]`` per entry, encoded with ``frac``
fractional bits chosen so that the sum of ``n`` silos' entries stays inside the signed range of the
ring: ``n * bound * 2^frac < 2^(bits-1)``. An entry outside ``[-bound, bound]`` is refused (it could
wrap the sum), never clipped silently. Parameters travel in the 32-bit ring (the bytes of float32),
statistics in the 64-bit ring (the bytes of float64).

No cipher is written here: X25519, HKDF, ChaCha20 and ChaCha20-Poly1305 come from the ``cryptography``
package, Shamir's scheme from ``pycryptodome``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
SHARE_BYTES = 2 + 2 * 16             # share index (2 bytes) + the shares of the key's two 16-byte halves
SEALED_BYTES = 12 + SHARE_BYTES + 16  # AEAD nonce + ciphertext + tag
RANGE32 = 4.0      # default bound on an entry of a weighted parameter update (config: secagg-range)
RANGE64 = 2.0 ** 36  # bound on an entry of a statistics vector (sums of activations and their squares)


class SecAggError(ValueError):
    """A secure-aggregation message or value that cannot be used; the text names the fix."""


# --------------------------------------------------------------------------- fixed point in a ring


@dataclass(frozen=True)
class Ring:
    """Integers mod 2^bits carrying reals of ``[-bound, bound]`` with ``frac`` fractional bits, chosen so
    that ``n`` summands cannot wrap."""

    bits: int
    frac: int
    bound: float

    @classmethod
    def for_sum(cls, bits: int, bound: float, n: int) -> "Ring":
        if bits not in (32, 64):
            raise SecAggError(f"a ring of 2^{bits}: use 32 or 64 bits")
        if not (bound > 0 and math.isfinite(bound)) or n < 1:
            raise SecAggError(f"secure aggregation needs a finite range > 0 and at least one silo, got {bound}, {n}")
        frac = math.floor(bits - 1 - math.log2(bound * n)) - 1  # one bit of headroom for the rounding
        if frac < 4:
            raise SecAggError(f"a range of ±{bound:g} for {n} silos leaves {frac} fractional bits in a {bits}-bit "
                              "ring; lower secagg-range")
        return cls(bits, frac, float(bound))

    @property
    def dtype(self):
        return np.uint32 if self.bits == 32 else np.uint64

    @property
    def resolution(self) -> float:
        """The step of the fixed point: one silo's rounding error is at most half of it per entry."""
        return 2.0 ** -self.frac

    def encode(self, x: np.ndarray, what: str = "a value") -> np.ndarray:
        x = np.asarray(x, np.float64)
        if not np.all(np.isfinite(x)):
            raise SecAggError(f"{what} holds NaN or infinity; a silo cannot mask a non-finite value")
        worst = float(np.max(np.abs(x))) if x.size else 0.0
        if worst > self.bound:
            raise SecAggError(f"{what} has an entry of magnitude {worst:.3g}, outside the secure-aggregation range "
                              f"±{self.bound:g}; raise secagg-range (it must bound every silo's entries)")
        signed = np.rint(x * 2.0 ** self.frac).astype(np.int64)
        return signed.view(np.uint64) if self.bits == 64 else (signed & 0xFFFFFFFF).astype(np.uint32)

    def decode(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, self.dtype)
        signed = y.view(np.int64) if self.bits == 64 else y.view(np.int32).astype(np.int64)
        return signed.astype(np.float64) * 2.0 ** -self.frac


# --------------------------------------------------------------------------- vectors and their layout


def flatten(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, list]:
    """(one float64 vector, its layout [[name, shape], ...]) of a record's arrays, in order."""
    layout = [[str(k), list(np.shape(v))] for k, v in arrays.items()]
    if not arrays:
        return np.zeros(0, np.float64), layout
    return np.concatenate([np.asarray(v, np.float64).reshape(-1) for v in arrays.values()]), layout


def unflatten(vec: np.ndarray, layout: Sequence) -> "OrderedDict[str, np.ndarray]":
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    at = 0
    for name, shape in layout:
        size = int(np.prod(shape, dtype=np.int64))
        out[str(name)] = vec[at:at + size].reshape(shape)
        at += size
    if at != vec.size:
        raise SecAggError(f"a summed vector of {vec.size} entries does not match its layout ({at})")
    return out


def layout_text(layout: Sequence) -> str:
    return json.dumps(layout, separators=(",", ":"))


def weighted_update(arrays: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray],
                    weight: float) -> "OrderedDict[str, np.ndarray]":
    """A train reply's weighted update ``w (x - g)`` in float64, array by array in the reply's order: what a
    silo masks under secure aggregation and what the server sums in the clear (:func:`fixed_point_sum`), the
    same numbers both ways."""
    return OrderedDict((k, weight * (np.asarray(a, np.float64) - np.asarray(sent[k], np.float64)))
                       for k, a in arrays.items())


def fixed_point_sum(vectors: Sequence[np.ndarray], ring: Ring, what: str = "a value") -> np.ndarray:
    """The sum of real vectors as secure aggregation computes it: each one fixed point in ``ring``, their
    sum in the ring (exact integer addition: the same whatever the order), decoded. The server of a plain
    run sums the silos' replies this way, so that plain and secure aggregation give the same model bit
    for bit and no reply order can change it."""
    return ring.decode(ring_sum([ring.encode(v, what) for v in vectors], ring))


def plain_ring(bits: int, bound: float, n: int, vectors: Sequence[np.ndarray]) -> Ring:
    """The ring a plain run sums ``vectors`` (of ``n`` silos) in: secure aggregation's own (``bits``,
    ``bound``) whenever its range holds every entry, as it must under secure aggregation; a wider range,
    a power of two, where an entry lies outside it (a plain run refuses no update for its size), and the
    64-bit ring where the 32-bit one could not hold it."""
    worst = max((float(np.max(np.abs(v))) for v in vectors if np.size(v)), default=0.0)
    if not math.isfinite(worst):
        raise SecAggError("a silo's reply holds NaN or infinity; it cannot be summed (its training diverged: "
                          "lower lr, or drop the silo)")
    if worst > bound:
        bound = 2.0 ** math.ceil(math.log2(worst))
    try:
        return Ring.for_sum(bits, bound, n)
    except SecAggError:
        return Ring.for_sum(64, bound, n)


# --------------------------------------------------------------------------- keys, seeds and masks


@dataclass(frozen=True)
class KeyPair:
    secret: bytes  # 32 raw bytes
    public: bytes  # 32 raw bytes

    @classmethod
    def new(cls) -> "KeyPair":
        sk = X25519PrivateKey.generate()
        return cls(_raw_secret(sk), _raw_public(sk.public_key()))

    @classmethod
    def of(cls, secret: bytes) -> "KeyPair":
        sk = X25519PrivateKey.from_private_bytes(bytes(secret))
        return cls(bytes(secret), _raw_public(sk.public_key()))


def _raw_secret(sk: X25519PrivateKey) -> bytes:
    return sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())


def _raw_public(pk: X25519PublicKey) -> bytes:
    return pk.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def agree(secret: bytes, peer_public: bytes, nonce: bytes, purpose: bytes) -> bytes:
    """The 32-byte key two silos share (X25519, then HKDF-SHA256 salted with the run's nonce)."""
    try:
        peer = X25519PublicKey.from_public_bytes(bytes(peer_public))
        shared = X25519PrivateKey.from_private_bytes(bytes(secret)).exchange(peer)
    except ValueError as e:
        raise SecAggError(f"a secure-aggregation public key is malformed ({e}); server and silos must run the same "
                          "fedhash") from None
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=bytes(nonce), info=b"fedhash secagg " + purpose
                ).derive(shared)


def prg(seed: bytes, label: str, ring: Ring, n: int) -> np.ndarray:
    """``n`` uniform ring elements from a 32-byte seed: ChaCha20's keystream, its nonce from the sum's label."""
    if n == 0:
        return np.zeros(0, ring.dtype)
    nonce = hashlib.sha256(f"{label}/{ring.bits}".encode()).digest()[:16]
    enc = Cipher(algorithms.ChaCha20(bytes(seed), nonce), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(n * ring.bits // 8)), ring.dtype).copy()


def pair_sign(me: int, other: int) -> int:
    """+1 if silo ``me`` adds the pair's mask, -1 if it subtracts it (the lower node id adds)."""
    return 1 if int(me) < int(other) else -1


def mask(q: np.ndarray, ring: Ring, label: str, self_seed: bytes, me: int, mask_secret: bytes,
         peers: Mapping[int, bytes], nonce: bytes) -> np.ndarray:
    """``y = q + PRG(b) + sum_j ±PRG(s_ij)`` (mod 2^bits) for peers ``{node id: s public key}``."""
    y = q.astype(ring.dtype, copy=True)
    y += prg(self_seed, label, ring, y.size)
    for j, pk in peers.items():
        if int(j) == int(me):
            continue
        m = prg(agree(mask_secret, pk, nonce, b"mask"), label, ring, y.size)
        if pair_sign(me, j) > 0:
            y += m
        else:
            y -= m
    return y


def unmask(total: np.ndarray, ring: Ring, label: str, self_seeds: Mapping[int, bytes],
           dropped_secrets: Mapping[int, bytes], mask_publics: Mapping[int, bytes], nonce: bytes) -> np.ndarray:
    """The sum of the contributors' ``q`` from the sum of their ``y`` (``total``): remove each
    contributor's self-mask (``self_seeds``: node id -> b) and its pairwise masks with every silo that
    did not contribute (``dropped_secrets``: node id -> s_sk rebuilt from shares); the pairwise masks
    among contributors cancel by themselves."""
    y = total.astype(ring.dtype, copy=True)
    for j, b in self_seeds.items():
        y -= prg(b, label, ring, y.size)
    for i, sk in dropped_secrets.items():
        for j in self_seeds:
            m = prg(agree(sk, mask_publics[j], nonce, b"mask"), label, ring, y.size)
            if pair_sign(j, i) > 0:  # contributor j added this mask: take it out
                y -= m
            else:
                y += m
    return y


def ring_sum(ys: Sequence[np.ndarray], ring: Ring) -> np.ndarray:
    out = np.zeros_like(np.asarray(ys[0], ring.dtype))
    for y in ys:
        if np.shape(y) != out.shape or np.asarray(y).dtype != ring.dtype:
            raise SecAggError(f"masked vectors of different shapes or types ({np.shape(y)} {np.asarray(y).dtype}, "
                              f"{out.shape} {out.dtype}); every silo must run the same head")
        out += y
    return out


def fresh_seed() -> bytes:
    return os.urandom(KEY_BYTES)


# --------------------------------------------------------------------------- Shamir shares of a key


def split_secret(secret: bytes, threshold: int, n: int) -> list[bytes]:
    """``n`` shares of a 32-byte secret, any ``threshold`` of which rebuild it (share k has index k+1)."""
    if len(secret) != KEY_BYTES:
        raise SecAggError(f"a secret to share is {len(secret)} bytes, not {KEY_BYTES}")
    if not 2 <= threshold <= n:
        raise SecAggError(f"a threshold of {threshold} for {n} silos: it must lie in 2..{n}")
    halves = [Shamir.split(threshold, n, secret[h * 16:(h + 1) * 16], ssss=False) for h in range(2)]
    out = []
    for k in range(n):
        (i0, a), (i1, b) = halves[0][k], halves[1][k]
        assert i0 == i1 == k + 1
        out.append((k + 1).to_bytes(2, "little") + a + b)
    return out


def combine_secret(shares: Sequence[bytes]) -> bytes:
    """The secret of :func:`split_secret` from at least its threshold of shares."""
    if not shares or any(len(s) != SHARE_BYTES for s in shares):
        raise SecAggError("malformed secret shares; server and silos must run the same fedhash")
    parts = [(int.from_bytes(s[:2], "little"), bytes(s[2:18]), bytes(s[18:34])) for s in shares]
    if len({p[0] for p in parts}) != len(parts):
        raise SecAggError("repeated secret shares; each silo sends its own")
    return b"".join(Shamir.combine([(p[0], p[1 + h]) for p in parts], ssss=False) for h in range(2))


def seal(key: bytes, share: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + ChaCha20Poly1305(bytes(key)).encrypt(nonce, bytes(share), aad)


def open_sealed(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    sealed = bytes(sealed)
    try:
        return ChaCha20Poly1305(bytes(key)).decrypt(sealed[:12], sealed[12:], aad)
    except InvalidTag:
        raise SecAggError("a secret share does not decrypt under its pair's key (altered on the way, or another "
                          "run's); the server must run the key setup again") from None


def share_aad(nonce: bytes, src: int, dst: int) -> bytes:
    return bytes(nonce) + int(src).to_bytes(8, "little") + int(dst).to_bytes(8, "little")


def majority(n: int) -> int:
    """The default threshold: more than half of the keyed silos (at least 2)."""
    return max(2, n // 2 + 1)


# --------------------------------------------------------------------------- node ids on the wire


def ids_bytes(ids: Sequence[int]) -> bytes:
    return np.asarray([int(i) for i in ids], np.uint64).tobytes()


def ids_of(blob: bytes) -> list[int]:
    blob = bytes(blob)
    if len(blob) % 8:
        raise SecAggError("a list of node ids is not whole 8-byte ids; server and silos must run the same fedhash")
    return [int(i) for i in np.frombuffer(blob, np.uint64)]


def keys_bytes(keys: Sequence[bytes]) -> bytes:
    if any(len(k) != KEY_BYTES for k in keys):
        raise SecAggError("a public key is not 32 bytes")
    return b"".join(bytes(k) for k in keys)


def keys_of(blob: bytes, n: int) -> list[bytes]:
    blob = bytes(blob)
    if len(blob) != n * KEY_BYTES:
        raise SecAggError(f"a table of {n} public keys holds {len(blob)} bytes, not {n * KEY_BYTES}")
    return [blob[i * KEY_BYTES:(i + 1) * KEY_BYTES] for i in range(n)]
