"""Examples in batches of similar length, in a seeded order that a count of batches drawn resumes exactly:
what every fine-tuning run and the encoder-decoder trainer feed the training loop."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any


def length_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch of index batches, grouped by length: shuffle, sort within windows of 50 batches (little
    padding), then shuffle the batches. A function of (seed, epoch) only, so a resumed run sees the same order."""
    rng = random.Random(seed * 1_000_003 + epoch)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    window = 50 * batch_size
    idx = [i for w in range(0, len(idx), window) for i in sorted(idx[w:w + window], key=lambda i: lengths[i])]
    batches = [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
    rng.shuffle(batches)
    return batches


def iter_batches(lengths: Sequence[int], batch_size: int, seed: int, start: int = 0) -> Iterator[list[int]]:
    """Batches forever (epoch after epoch), skipping the first `start` (for resume)."""
    per_epoch = max(1, -(-len(lengths) // batch_size))
    epoch, skip = divmod(start, per_epoch)
    while True:
        yield from length_batches(lengths, batch_size, seed, epoch)[skip:]
        epoch, skip = epoch + 1, 0


def sorted_batches(items: Sequence[Any], length: Callable[[Any], int], batch_size: int) -> list[list[Any]]:
    """Items in batches of similar length (shortest first): the fixed order of evaluation passes."""
    order = sorted(items, key=length)
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


class ExampleStream:
    """Training examples as a `DataSource`: each rank takes its own micro-batch of every `world` drawn
    from the length-grouped order, which a count of the micro-batches drawn resumes exactly."""

    def __init__(self, items: Sequence[Any], lengths: Sequence[int], batch_size: int, seed: int, grad_accum: int,
                 rank: int = 0, world: int = 1) -> None:
        self.items, self.lengths, self.batch_size, self.seed = items, lengths, batch_size, seed
        self.grad_accum, self.rank, self.world = grad_accum, rank, world
        self.consumed = 0  # micro-batches drawn from the order, by all ranks together
        self._order: Iterator[list[int]] | None = None

    def next_batch(self) -> list[Any]:
        if self._order is None:
            self._order = iter_batches(self.lengths, self.batch_size, self.seed, self.consumed)
        mine = [next(self._order) for _ in range(self.world)][self.rank]
        self.consumed += self.world
        return [self.items[i] for i in mine]

    def state_dict(self) -> dict[str, Any]:
        return {"micro_batches": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed = int(state.get("micro_batches", int(state["step"]) * self.grad_accum))
        self._order = None
