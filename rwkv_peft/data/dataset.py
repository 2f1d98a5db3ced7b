"""Training samples for the three --dataload modes.

Every sample is a pure function of (seed, epoch, rank, index), so a run resumed at
(epoch, index) sees exactly the samples it would have seen; ranks never share a sample
stream. Each sample is a dict of input_ids / targets (LongTensor[ctx_len]) and mask
(FloatTensor[ctx_len], 1 where the target counts in the loss).

- get: RWKV-LM style windows of ctx_len+1 tokens at random offsets of the whole token
  stream (documents back to back, each ending in token 0), or, with magic_prime, the
  RWKV-LM schedule that visits every ctx_len-aligned window exactly once.
- pad / sft: one document per sample, truncated or padded with 0 to ctx_len; padding (and
  in sft the prompt) is masked out.
- chat: per-token loss flags (1 = trained as a target) travel with the tokens, in the
  windows of `get` as in the documents of `pad`. Documents are visited in a fresh pseudo-random order
  on every pass over the data set, using a keyed permutation (no O(N) shuffle table).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .binidx import BinIdx

_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finalizer: a cheap, well-spread hash of a 64-bit integer."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def permute(i: int, n: int, key: int) -> int:
    """Image of i under a bijection of [0, n) chosen by key (Feistel, cycle walking)."""
    if not 0 <= i < n:
        raise IndexError(f"permute: {i} outside [0, {n})")
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    x = i
    while True:  # the cycle through i returns below n; expected < 4 steps as 4**half < 4n
        left, right = x >> half, x & mask
        for r in range(4):
            left, right = right, left ^ (_mix64(right ^ _mix64(key + r)) & mask)
        x = (left << half) | right
        if x < n:
            return x


def is_magic_prime(p: int) -> bool:
    """RWKV-LM's magic_prime: a prime with p % 3 == 2, so x -> x**3 permutes [0, p)."""
    if p < 5 or p % 3 != 2:
        return False
    return all(p % d for d in range(2, math.isqrt(p) + 1))


def largest_magic_prime(n_tokens: int, ctx_len: int) -> int:
    """The magic_prime RWKV-LM would pick for n_tokens: the largest one with
    p * ctx_len + 1 <= n_tokens (0 if there is none)."""
    p = (n_tokens - 1) // ctx_len
    while p >= 5 and not is_magic_prime(p):
        p -= 1
    return p if p >= 5 else 0


class _Samples(Dataset):
    """Shared epoch / length / rank bookkeeping."""

    def __init__(self, ctx_len: int, samples_per_epoch: int, seed: int, rank: int,
                 world_size: int):
        if ctx_len < 1:
            raise ValueError(f"ctx_len must be >= 1, got {ctx_len}")
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 for reproducible samples, got {seed}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.ctx_len, self.samples_per_epoch = ctx_len, samples_per_epoch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.summary = ""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _global_index(self, i: int) -> int:
        """Position of local sample i in the global order (ranks interleave)."""
        if not 0 <= i < self.samples_per_epoch:
            raise IndexError(f"sample {i} outside [0, {self.samples_per_epoch})")
        return (self.epoch * self.samples_per_epoch + i) * self.world_size + self.rank


class GetDataset(_Samples):
    """Random ctx_len+1 windows over one token stream (RWKV-LM's `get` data loader)."""

    def __init__(self, stream: np.ndarray | BinIdx, check: Callable[[int, np.ndarray], None],
                 name: str, ctx_len: int, samples_per_epoch: int, seed: int, rank: int = 0,
                 world_size: int = 1, magic_prime: int = 0, longest_doc: int | None = None,
                 flags: np.ndarray | BinIdx | None = None):
        """stream: the tokens, or a BinIdx (pickles by path for DataLoader workers); flags:
        a loss flag per stream token (default: every target trained)."""
        super().__init__(ctx_len, samples_per_epoch, seed, rank, world_size)
        self.stream, self.check, self.magic_prime = stream, check, magic_prime
        self.flags = flags
        self.n_tokens = n = stream.num_tokens if isinstance(stream, BinIdx) else len(stream)
        if n < ctx_len + 1:
            longest = "" if longest_doc is None else f", longest document {longest_doc}"
            raise ValueError(f"{name}: {n} tokens in all{longest}; dataload 'get' needs at "
                             f"least ctx_len+1 = {ctx_len + 1} (lower --ctx_len or use "
                             "--dataload pad)")
        if magic_prime:
            if not is_magic_prime(magic_prime):
                raise ValueError(f"--magic_prime {magic_prime}: expected a prime p with "
                                 f"p % 3 == 2 (for {name}: "
                                 f"{largest_magic_prime(n, ctx_len)})")
            if magic_prime * ctx_len + 1 > n:
                raise ValueError(f"--magic_prime {magic_prime}: too large for {name} "
                                 f"({n} tokens): need magic_prime * ctx_len + 1 <= {n}; "
                                 f"use {largest_magic_prime(n, ctx_len)}")
            self._factor = int(magic_prime * (math.sqrt(5) - 1) / 2)

    def start_of(self, i: int) -> int:
        """Stream offset of sample i in the current epoch."""
        g = self._global_index(i)
        if self.magic_prime:
            ii = 1 + g  # RWKV-LM: 1 + epoch * samples * world + idx * world + rank
            return (self._factor * ii**3 % self.magic_prime) * self.ctx_len
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, i])
        return int(rng.integers(0, self.n_tokens - self.ctx_len))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.start_of(i)
        tokens = self.stream.tokens if isinstance(self.stream, BinIdx) else self.stream
        win = np.asarray(tokens[s : s + self.ctx_len + 1])
        self.check(s, win)
        win = torch.from_numpy(win.astype(np.int64))
        if self.flags is None:
            mask = torch.ones(self.ctx_len, dtype=torch.float32)
        else:
            flags = self.flags.tokens if isinstance(self.flags, BinIdx) else self.flags
            mask = torch.from_numpy(np.asarray(flags[s + 1 : s + self.ctx_len + 1], np.float32))
        return {"input_ids": win[:-1], "targets": win[1:], "mask": mask}


class DocDataset(_Samples):
    """One document per sample, padded/truncated; loss from token loss_start[d] on, or
    where the document's flags say."""

    def __init__(self, docs: Sequence[np.ndarray], check: Callable[[int, np.ndarray], None],
                 ctx_len: int, samples_per_epoch: int, seed: int, rank: int = 0,
                 world_size: int = 1, loss_start: np.ndarray | None = None,
                 order: np.ndarray | None = None, flags: Sequence[np.ndarray] | None = None):
        """order: the usable document indices (default all); loss_start and flags (a loss
        flag per token) are indexed like docs."""
        super().__init__(ctx_len, samples_per_epoch, seed, rank, world_size)
        self.docs, self.check, self.loss_start, self.order = docs, check, loss_start, order
        self.flags = flags
        self.n_docs = len(order) if order is not None else len(docs)

    def doc_of(self, i: int) -> int:
        """Document index of sample i in the current epoch."""
        pass_, j = divmod(self._global_index(i), self.n_docs)
        d = permute(j, self.n_docs, _mix64(_mix64(self.seed & _M64) ^ pass_))
        return int(self.order[d]) if self.order is not None else d

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.doc_sample(self.doc_of(i))

    def doc_flags(self, d: int, length: int | None = None) -> np.ndarray:
        """Loss flags (uint8, 1 = trained target) of document d's first `length` tokens
        (default: all)."""
        length = len(self.docs[d]) if length is None else min(length, len(self.docs[d]))
        if self.flags is not None:
            return np.asarray(self.flags[d][:length], dtype=np.uint8)
        flags = np.zeros(length, dtype=np.uint8)
        flags[1 if self.loss_start is None else max(int(self.loss_start[d]), 1):] = 1
        return flags

    def doc_sample(self, d: int) -> dict[str, torch.Tensor]:
        """The sample of document d: its first ctx_len+1 tokens, padded."""
        doc = np.asarray(self.docs[d][: self.ctx_len + 1])
        self.check(d, doc)
        n = len(doc) - 1  # real targets
        ids = torch.zeros(self.ctx_len + 1, dtype=torch.long)
        ids[: n + 1] = torch.from_numpy(doc.astype(np.int64))
        mask = torch.zeros(self.ctx_len, dtype=torch.float32)
        mask[:n] = torch.from_numpy(self.doc_flags(d, n + 1)[1:].astype(np.float32))
        return {"input_ids": ids[:-1], "targets": ids[1:], "mask": mask}


class ItemDataset(DocDataset):
    """One record (a dict of anything) per sample, in DocDataset's seeded order: data types whose
    samples are not token windows, e.g. preference pairs or prompts to roll out."""

    def doc_sample(self, d: int) -> dict:
        return self.docs[d]
