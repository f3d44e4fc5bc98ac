"""A stage's mixture: tokens, blocks and epochs per source, and the global order of blocks.

The order is a pure function of (seed, per-source token counts, weights, budget, seq_len), so a
position in a stage is one integer: resuming at block k costs the same as starting, repeats
nothing and skips nothing. Block k of the order is (source, block index within that source's
stream); a block is `seq_len` consecutive tokens of the source's packed train stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.spec import MixtureSpec


@dataclass
class SourcePlan:
    name: str
    weight: float
    share: float  # normalised weight
    available_blocks: int
    blocks: int  # blocks of this source in the stage
    tokens: int
    epochs: float  # how often the source's data is seen
    warnings: list[str] = field(default_factory=list)


@dataclass
class MixturePlan:
    seq_len: int
    total_blocks: int
    sources: list[SourcePlan]

    @property
    def tokens(self) -> int:
        return self.total_blocks * self.seq_len

    @property
    def warnings(self) -> list[str]:
        return [w for s in self.sources for w in s.warnings]


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    exact = weights / weights.sum() * total
    base = np.floor(exact).astype(np.int64)
    rest = total - int(base.sum())
    if rest > 0:
        base[np.argsort(-(exact - base), kind="stable")[:rest]] += 1
    return base


def plan_mixture(mix: MixtureSpec, train_tokens: dict[str, int], seq_len: int) -> MixturePlan:
    """Blocks per source. `train_tokens` maps source → prepared training tokens (None if unknown)."""
    names = list(mix.weights)
    w = np.array([mix.weights[n] for n in names], dtype=np.float64)
    avail = np.array([(train_tokens.get(n) or 0) // seq_len for n in names], dtype=np.int64)
    if mix.tokens is not None:
        blocks = _largest_remainder(w, mix.tokens // seq_len)
    else:  # epochs: every source with a positive weight is seen `epochs` times
        blocks = np.where(w > 0, np.floor(avail * mix.epochs).astype(np.int64), 0)
    out = []
    for i, n in enumerate(names):
        epochs = float(blocks[i] / avail[i]) if avail[i] else float("inf") if blocks[i] else 0.0
        warns = []
        if blocks[i] and not avail[i] and n in train_tokens and train_tokens[n] is not None:
            warns.append(f"{n}: has fewer than seq_len={seq_len} tokens and cannot fill its share of {int(blocks[i])} blocks")
        elif avail[i] and epochs > mix.max_repeats:
            warns.append(f"{n}: repeats {epochs:.1f} times (more than max_repeats={mix.max_repeats:g}); add data or lower its weight")
        out.append(SourcePlan(n, float(w[i]), float(w[i] / w.sum()), int(avail[i]), int(blocks[i]),
                              int(blocks[i]) * seq_len, epochs, warns))
    return MixturePlan(seq_len, int(blocks.sum()), out)


def block_order(plan: MixturePlan, seed: int, shuffle: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The global order: arrays (source index, block index within the source), one entry per block.

    Each source's blocks are taken epoch by epoch, each epoch a fresh permutation (or in order if
    not shuffled); the sources are interleaved by a seeded permutation of their labels, so every
    stretch of the stage has the requested proportions in expectation.
    """
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(plan.sources), dtype=np.int32), [s.blocks for s in plan.sources])
    if shuffle:
        labels = rng.permutation(labels)
    idx = np.empty(len(labels), dtype=np.int64)
    for si, s in enumerate(plan.sources):
        if not s.blocks:
            continue
        if not s.available_blocks:
            raise ValueError(f"source {s.name!r} has no complete block of {plan.seq_len} tokens")
        srng = np.random.default_rng([seed, si])
        n_ep = -(-s.blocks // s.available_blocks)
        seq = np.concatenate([srng.permutation(s.available_blocks) if shuffle else np.arange(s.available_blocks)
                              for _ in range(n_ep)])[: s.blocks]
        idx[labels == si] = seq
    return labels, idx


def rank_positions(step: int, rank: int, world: int, global_batch: int, micro_batch: int) -> list[range]:
    """The positions of the global order that `rank` trains on at optimizer step `step`, one range per
    micro-batch: rank r takes the r-th contiguous slice of the step's global batch, so the ranks
    together cover [step*global_batch, (step+1)*global_batch) exactly once (the trainer's slicing)."""
    per_rank = global_batch // world
    base = step * global_batch + rank * per_rank
    return [range(base + m, base + m + micro_batch) for m in range(0, per_rank, micro_batch)]
