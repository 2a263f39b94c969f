"""Synthetic activations drawn from a known sparse dictionary (tests, benchmarks, `train-sae --synthetic`).

Every token is a sum of `active` atoms drawn uniformly (a repeat within a token is possible but rare
for num_atoms >> active; it just adds the coefficients), with coefficients
uniform in [0.5, 1.5], plus optional Gaussian noise. Atoms are random unit vectors. Batches are
generated on the fly from (seed, batch index), so the set is re-iterable, deterministic and never
materialised.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class SyntheticSparseData:
    d: int = 64
    num_atoms: int = 512
    active: int = 8
    num_tokens: int = 1_000_000
    batch_size: int = 4096
    noise: float = 0.0
    seed: int = 0

    def __post_init__(self):
        g = torch.Generator().manual_seed(self.seed)
        atoms = torch.randn(self.num_atoms, self.d, generator=g)
        self.atoms: Tensor = atoms / atoms.norm(dim=1, keepdim=True)

    def batch(self, i: int, n: int | None = None) -> Tensor:
        n = n or self.batch_size
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * (i + 1))
        idx = torch.randint(self.num_atoms, (n, self.active), generator=g)
        coef = 0.5 + torch.rand(n, self.active, generator=g)
        # embedding_bag sums the chosen atoms without an [n, active, d] intermediate.
        x = F.embedding_bag(idx, self.atoms, per_sample_weights=coef, mode="sum")
        if self.noise:
            x = x + self.noise * torch.randn(n, self.d, generator=g)
        return x

    def __iter__(self):
        done, i = 0, 0
        while done < self.num_tokens:
            n = min(self.batch_size, self.num_tokens - done)
            yield self.batch(i, n)
            done += n
            i += 1

    def __len__(self) -> int:
        return -(-self.num_tokens // self.batch_size)


def best_cosine(atoms: Tensor, decoder: Tensor) -> Tensor:
    """For every true atom, the highest cosine similarity to any decoder row."""
    a = atoms / atoms.norm(dim=1, keepdim=True)
    w = decoder / decoder.norm(dim=1, keepdim=True)
    return (a @ w.t()).max(dim=1).values
