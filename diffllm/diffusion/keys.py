"""Keys of the training objective's random draws: (seed, optimizer step, global row index).

Every random number the objective draws for a row (its time t, its mask draw) comes from a
generator seeded with a hash of

    (seed, step, row, stream)

where ``step`` is the optimizer step (``trainer.global_step``: it does not move between the
micro-batches of one accumulation window), ``row`` the row's position in the global batch of that
step, and ``stream`` names the quantity ("time", "mask", ...) so that two quantities never share
numbers. A row therefore gets the same draws however the global batch is cut into ranks and
micro-batches, and a run resumed at step k draws what the uninterrupted run drew: the key holds
no state that a checkpoint would have to carry.

Global row index, for W ranks, micro-batches of B rows, accumulation k (the order in which
``torch.utils.data.DistributedSampler`` deals a global batch of k*B*W consecutive rows of its
permutation out to the ranks):

    row(rank r, micro-batch m, i-th row) = (m * B + i) * W + r,       0 <= row < k * B * W

The seed is a 64-bit BLAKE2b digest of the key's integers (stream names through CRC-32); the numbers
are drawn by a CPU ``torch.Generator`` per row and moved to the batch's device, so a row's draws
are the same on every device and independent of the padded length.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def stream_id(stream: str) -> int:
    """A stable integer for a stream name (CRC-32, not Python's salted ``hash``)."""
    return zlib.crc32(stream.encode())


def key_seed(*key: int | str) -> int:
    """A 64-bit generator seed from a key tuple, e.g. ``key_seed(seed, step, row, "mask")``."""
    words = [stream_id(k) if isinstance(k, str) else int(k) for k in key]
    if any(w < 0 for w in words):
        raise ValueError(f"draw keys must be non-negative integers or names, got {key}")
    if any(w >= 2**64 for w in words):
        raise ValueError(f"draw keys must fit in 64 bits, got {key}")
    digest = hashlib.blake2b(struct.pack(f"<{len(words)}Q", *words), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def keyed_generator(*key: int | str) -> torch.Generator:
    """A CPU generator seeded from ``key`` (see :func:`key_seed`)."""
    return torch.Generator().manual_seed(key_seed(*key))


def global_row_index(
    micro_batch_size: int, rows: int, micro_batch: int = 0, rank: int = 0, world_size: int = 1
) -> list[int]:
    """Positions in the step's global batch of the ``rows`` rows of one micro-batch (module docstring).

    micro_batch_size: B, the configured rows per micro-batch (a short last batch has ``rows < B``)
    micro_batch:      m, 0..k-1, the micro-batch's place in its accumulation window
    """
    if rows > micro_batch_size:
        raise ValueError(
            f"a micro-batch of {rows} rows is larger than the micro-batch size {micro_batch_size}"
        )
    return [(micro_batch * micro_batch_size + i) * world_size + rank for i in range(rows)]


@dataclass(frozen=True)
class DrawKeys:
    """The keys of one micro-batch's rows.

    seed:              the run's seed
    step:              the optimizer step the micro-batch belongs to
    rows:              (B,) global row indices, e.g. from :func:`global_row_index`
    global_batch_size: rows in the step's global batch (k * B * W): the antithetic strata
    """

    seed: int
    step: int
    rows: Sequence[int]
    global_batch_size: int

    def __post_init__(self) -> None:
        bad = [r for r in self.rows if not 0 <= r < self.global_batch_size]
        if bad:
            raise ValueError(
                f"global row indices {bad[:3]} are outside the global batch of {self.global_batch_size} rows"
            )

    def uniform(self, stream: str, n: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, n) U[0, 1) numbers: row b's first n numbers of its ``stream``.

        Row b's k-th number does not depend on n (a generator draws them in order), so a row padded
        to another length gets the same numbers at the same positions.
        """
        rows = [
            torch.rand(n, generator=keyed_generator(self.seed, self.step, row, stream)) for row in self.rows
        ]
        return (torch.stack(rows) if rows else torch.empty(0, n)).to(device)

    def step_generator(self, stream: str) -> torch.Generator:
        """A generator keyed on (seed, step, stream) only: the same on every rank and micro-batch."""
        return keyed_generator(self.seed, self.step, stream)
