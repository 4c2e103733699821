"""The training crops of each optimiser step, drawn in the training process or by background workers.

Item i of `StepCrops` is the whole input of optimiser step `first + i` on one rank: one `MicroBatch` per
gradient-accumulation micro-batch, each a function of (seed, rank, step, micro) alone. So any number of workers
give the very batches the training process would draw itself, in step order, and a resumed run starts the
stream at its step with nothing else to restore. Under torchrun each rank draws its own crops (its rank is
in the seed) from the whole training set.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..latents import LatentStats
from .dataset import file_weights, random_crops, step_generator


@dataclass
class MicroBatch:
    x: torch.Tensor  # (B, L, 64) normalised crops
    valid: torch.Tensor  # (B, n) which chunks are data, not padding
    rng: torch.Tensor  # state of the micro-batch's generator after the crops were drawn

    def generator(self) -> torch.Generator:
        """The micro-batch's generator, where the crops left it: the training noise continues from it."""
        g = torch.Generator()
        g.set_state(self.rng)
        return g


class StepCrops(Dataset):
    """Map-style dataset: item i is the list of `grad_accum` micro-batches of step first + i (steps before last)."""

    def __init__(self, files: list, stats: LatentStats, batch: int, crop_chunks: int, grad_accum: int, seed: int,
                 rank: int, first: int, last: int):
        self.files, self.stats, self.batch, self.crop_chunks = files, stats, batch, crop_chunks
        self.grad_accum, self.seed, self.rank, self.first, self.last = grad_accum, seed, rank, first, last
        self.weights = file_weights(files) if files else None  # (F,)

    def __len__(self) -> int:
        return max(0, self.last - self.first)

    def __getitem__(self, i: int) -> list[MicroBatch]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        out = []
        for micro in range(self.grad_accum):
            g = step_generator(self.seed, self.rank, self.first + i, micro)
            x, valid = random_crops(self.files, self.stats, self.batch, self.crop_chunks, g, self.weights)
            out.append(MicroBatch(x, valid, g.get_state()))
        return out


@contextlib.contextmanager
def step_batches(crops: StepCrops, num_workers: int = 0) -> Iterator[Iterator[list[MicroBatch]]]:
    """The steps' micro-batches in order: drawn on demand (num_workers 0) or read ahead by background worker
    processes (2 steps each); leaving the block stops the workers."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if num_workers == 0:
        stream = (crops[i] for i in range(len(crops)))
    else:
        loader = DataLoader(crops, batch_size=None, shuffle=False, num_workers=num_workers, prefetch_factor=2)
        stream = (item for item in loader)  # holds the only reference to the loader's iterator
    try:
        yield stream
    finally:
        stream.close()  # drops that iterator, which stops its workers
