"""The training order: a pure function of (seed, pass), resumable at any batch.

A *pass* is one sweep over the training rows. Pass p's global order is a permutation drawn from a
CPU generator seeded with the run's seed (optionally length-grouped, transformers'
``get_length_grouped_indices``: a random permutation cut into mega-batches, each sorted by length).
The permutations are the ones the project's loaders gave before this module existed, so figures
measured with them stay valid: each epoch of ``DataLoader(shuffle=True, generator=g)`` drew one
int64 (its worker seed), one permutation (the order) and, on exhaustion, one more permutation
(``RandomSampler``'s tail), all from g; ``LengthGroupedSampler(generator=g)`` drew one grouped
permutation per epoch. ``tests/test_resume.py`` pins the equality with both.

With W ranks, rank r reads positions r, r + W, r + 2W, ... of the pass's order (padded by wrapping
to a multiple of W, as ``DistributedSampler`` does), so rank r's i-th row of its m-th micro-batch is
the global batch's row (m B + i) W + r: the convention of the draw keys
(``diffllm.diffusion.keys``), and one global order however many ranks read it.

Position: the number of training batches consumed since the run began (all passes). The sampler
starts at ``position`` and every ``iter`` continues to the end of the current pass; the loader's
``state_dict`` is that position as the Trainer counts it (batches that reached ``training_step``,
not the batch Lightning prefetches), and ``load_state_dict`` restores it, so a resumed run reads
the batches the uninterrupted run would have read next.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler
from transformers.trainer_pt_utils import get_length_grouped_indices


class DataOrderMismatchError(ValueError):
    """A checkpoint's data position does not fit this run's passes (other data, batch size or ranks)."""


class PassOrder:
    """``order(p)``: pass p's global permutation of ``num_rows`` rows (module docstring).

    lengths:    per-row lengths: length-grouped passes (mega-batches of ``group_batch_size`` x 50)
    Consecutive passes reuse the generator (no replay); an earlier pass replays from the seed.
    """

    def __init__(
        self, num_rows: int, seed: int, lengths: Sequence[int] | None = None, group_batch_size: int = 1
    ) -> None:
        if lengths is not None and len(lengths) != num_rows:
            raise ValueError(f"{len(lengths)} lengths for {num_rows} rows")
        self.num_rows, self.seed = int(num_rows), int(seed)
        self.lengths = list(lengths) if lengths is not None else None
        self.group_batch_size = int(group_batch_size)
        self._next_pass, self._generator = 0, torch.Generator().manual_seed(self.seed)

    def _draw(self, generator: torch.Generator) -> list[int]:
        if self.lengths is not None:
            return get_length_grouped_indices(self.lengths, self.group_batch_size, generator=generator)
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # the old loader's worker seed
        order = torch.randperm(self.num_rows, generator=generator).tolist()
        torch.randperm(self.num_rows, generator=generator)  # RandomSampler's tail on exhaustion
        return order

    def __call__(self, p: int) -> list[int]:
        if p < self._next_pass:  # an earlier pass: replay from the seed
            self._next_pass, self._generator = 0, torch.Generator().manual_seed(self.seed)
        while True:
            order = self._draw(self._generator)
            self._next_pass += 1
            if self._next_pass > p:
                return order


class ResumableSampler(DistributedSampler):
    """Rank ``rank``'s rows of the training order, from batch ``position`` on (module docstring).

    A ``DistributedSampler`` so that Lightning keeps it under DDP instead of wrapping it; it ignores
    ``set_epoch`` (Lightning's epoch count restarts differently after a resume): the pass follows
    from the position alone.
    """

    def __init__(
        self,
        num_rows: int,
        batch_size: int,
        seed: int,
        lengths: Sequence[int] | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        position: int = 0,
    ) -> None:
        super().__init__(range(num_rows), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size = int(batch_size)
        self.order = PassOrder(num_rows, seed, lengths, group_batch_size=self.batch_size * num_replicas)
        self.position = int(position)

    @property
    def batches_per_pass(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:  # the pass comes from the position, not from Lightning
        pass

    def rank_rows(self, p: int) -> list[int]:
        """Pass p's rows for this rank (``DistributedSampler``'s padding and striding)."""
        order = self.order(p)
        pad = self.total_size - len(order)
        order += (order * math.ceil(pad / len(order)))[:pad] if pad else []
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        p, skip = divmod(self.position, self.batches_per_pass)
        rows = self.rank_rows(p)
        for start in range(skip * self.batch_size, len(rows), self.batch_size):
            self.position += 1  # this batch is handed out (Lightning may prefetch it)
            yield from rows[start : start + self.batch_size]

    def __len__(self) -> int:
        return self.num_samples


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a ``ResumableSampler`` whose state is its position in batches.

    consumed: the batches the Trainer has trained on (``Trainer.fit_loop.total_batch_idx + 1``),
    the position a checkpoint must hold; without it the sampler's own count is used.
    """

    def __init__(self, *args: Any, consumed: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError(f"ResumableLoader needs a ResumableSampler, got {type(self.sampler).__name__}")
        self.consumed = consumed

    def state_dict(self) -> dict[str, int]:
        position = self.consumed() if self.consumed is not None else self.sampler.position
        return {"position": int(position), "batches_per_pass": self.sampler.batches_per_pass}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("batches_per_pass", self.sampler.batches_per_pass) != self.sampler.batches_per_pass:
            raise DataOrderMismatchError(
                f"the checkpoint's data order has {state['batches_per_pass']} batches per pass, this run "
                f"{self.sampler.batches_per_pass}: resume with the data, batch size and ranks it was written with"
            )
        self.sampler.position = int(state["position"])
