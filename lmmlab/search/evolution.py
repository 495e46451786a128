"""The refinement stage: EvoPress's (1 + λ) evolution over per-linear levels and per-layer KV pairs, with multi-step
selection (Sieberling et al. 2024, "EvoPress"; github IST-DASLab/EvoPress, evo_prune_search.py).

Genome: every gene's level — a gene is one prunable linear, or one decoder layer with all its linears — as an index
into its levels (`database.count_levels`), and every layer's K ≥ V pair (an index into the pair list, costliest
first). The stage knows a level only by the weights it removes; the caller turns a genome into a plan.

Mutation (EvoPress): min(U{1..3}, U{1..3}) switches. A weight switch takes one linear one level up (sparser) and
another one level down whose step removes exactly as many weights as the first one's adds back — any two linears
with count levels (`database.count_levels`: every step is Δ weights), linears of one size on a shared grid — so the
number of weights kept never changes. A KV switch (drawn with probability max(1/4, the KV genes' share)) takes one
layer to the next costlier pair, then other layers, at random, to their next cheaper pair until the mean cost is back
at or below the parent's. A mutant equal to the parent or to a sibling is drawn again.

Multi-step selection (EvoPress's `selection`): the generation's `offspring` mutants are scored on a fresh set of
rows of `tokens` tokens per step, and the best `survivors` go on to the next step with more tokens; before the last
step the parent joins them (elitism); the one survivor of the last step is the next parent. Every score is the
caller's fitness (the KL divergence from the dense model: `lmmlab.fitness`), lower is better.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from lmmlab.kv import pairs as kvpairs

log = logging.getLogger(__name__)

OFFSPRING = 16
SELECTION = ((4, 256), (1, 1024))  # (survivors, tokens) per selection step
MAX_FLIPS = 3


@dataclass(frozen=True)
class Genome:
    levels: tuple[int, ...]  # per linear: an index into its levels
    pairs: tuple[int, ...] = ()  # per layer: an index into the pair list (costliest first); empty: KV not searched


@dataclass
class Candidate:
    genome: Genome
    scores: list[float]  # one per selection step it was scored at
    parent: bool = False  # the generation's parent (elitism)


@dataclass
class Evolution:
    """The stage's search space and settings; `run` evolves a start genome."""

    removed: Sequence[Sequence[int | None]]  # per gene (a linear, or a layer): weights removed at each level index
    #                                           (None: no such level)
    pairs: Sequence[kvpairs.Pair] = ()  # the KV pairs, costliest first (empty: KV not searched)
    offspring: int = OFFSPRING
    selection: Sequence[tuple[int, int]] = SELECTION
    max_flips: int = MAX_FLIPS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.offspring < 1 or self.max_flips < 1:
            raise ValueError(f"offspring and max_flips must be >= 1; got {self.offspring}, {self.max_flips}")
        check_selection(self.selection, self.offspring)
        self.pairs = sorted(self.pairs, key=lambda p: (-kvpairs.cost(p), -p[0]))

    # -- mutation

    def step(self, k: int, j: int, direction: int) -> int | None:
        """Weights gene `k` removes more (direction +1) or fewer (−1) moving from level `j` to the next level in
        that direction, or None where there is none."""
        row = self.removed[k]
        nxt = j + direction
        if not 0 <= nxt < len(row) or row[nxt] is None:
            return None
        return direction * (row[nxt] - row[j])

    def weight_switch(self, levels: list[int], rng: np.random.Generator, tries: int = 64) -> bool:
        """One linear a level up and another a level down that moves exactly as many weights (see the module
        docstring); False when no such pair was found in `tries` draws."""
        n = len(levels)
        for _ in range(tries):
            up = int(rng.integers(n))
            added = self.step(up, levels[up], +1)
            if added is None:
                continue
            downs = [k for k in range(n) if k != up and self.step(k, levels[k], -1) == added]
            if downs:
                down = downs[int(rng.integers(len(downs)))]
                levels[up] += 1
                levels[down] -= 1
                return True
        return False

    def kv_switch(self, pairs: list[int], rng: np.random.Generator) -> bool:
        """One layer to its next costlier pair, others to their next cheaper one until the mean cost is back at or
        below what it was; False when no layer can go up or the others cannot pay for it."""
        cost = [kvpairs.cost(p) for p in self.pairs]
        ups = [l for l in range(len(pairs)) if pairs[l] > 0]
        if not ups:
            return False
        before = sum(cost[p] for p in pairs)
        new = list(pairs)
        up = ups[int(rng.integers(len(ups)))]
        new[up] -= 1
        moved = {up}
        while sum(cost[p] for p in new) > before + 1e-9:
            downs = [l for l in range(len(new)) if l not in moved and new[l] < len(cost) - 1]
            if not downs:
                return False
            down = downs[int(rng.integers(len(downs)))]
            new[down] += 1
            moved.add(down)
        pairs[:] = new
        return True

    def mutate(self, parent: Genome, rng: np.random.Generator) -> Genome:
        """`parent` after min(U{1..max_flips}, U{1..max_flips}) switches (see the module docstring)."""
        levels, pairs = list(parent.levels), list(parent.pairs)
        flips = min(int(rng.integers(1, self.max_flips + 1)), int(rng.integers(1, self.max_flips + 1)))
        movable = any(sum(g is not None for g in row) > 1 for row in self.removed)
        p_kv = (max(0.25, len(pairs) / (len(pairs) + len(levels))) if movable else 1.0) \
            if pairs and len(self.pairs) > 1 else 0.0
        for _ in range(flips):
            if rng.random() < p_kv:
                self.kv_switch(pairs, rng) or self.weight_switch(levels, rng)
            else:
                self.weight_switch(levels, rng) or (p_kv > 0 and self.kv_switch(pairs, rng))
        return Genome(tuple(levels), tuple(pairs))

    def children(self, parent: Genome, rng: np.random.Generator, max_draws: int = 1000) -> list[Genome]:
        """`offspring` distinct mutants, none equal to the parent (fewer only if the space has no more)."""
        out: list[Genome] = []
        for _ in range(max_draws):
            if len(out) == self.offspring:
                break
            child = self.mutate(parent, rng)
            if child != parent and child not in out:
                out.append(child)
        return out

    # -- selection

    def generation(self, parent: Genome, g: int, score: Callable[[Genome, int, int], float]) -> list[Candidate]:
        """One generation: mutants of `parent`, scored step by step (`score(genome, tokens, start_row)`), the parent
        joining before the last step. Returns every candidate with its scores, the next parent first."""
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, g])
        pool = [Candidate(child, []) for child in self.children(parent, rng)]
        alive = list(pool)
        for s, (survivors, tokens) in enumerate(self.selection):
            if s == len(self.selection) - 1:
                elder = Candidate(parent, [], parent=True)
                pool.append(elder)
                alive.append(elder)
            start = int(rng.integers(1 << 30))
            for candidate in alive:
                candidate.scores.append(score(candidate.genome, tokens, start))
            alive = sorted(alive, key=lambda c: (c.scores[-1], c.parent is False))[:survivors]
        best = alive[0]
        return [best] + [c for c in pool if c is not best]


def check_selection(selection: Sequence[tuple[int, int]], offspring: int) -> None:
    """Survivors decrease to 1 over the steps, tokens grow; else a one-line ValueError."""
    if not selection:
        raise ValueError("the selection needs at least one (survivors, tokens) step")
    survivors = [s for s, _ in selection]
    tokens = [t for _, t in selection]
    if survivors[-1] != 1 or any(s < 1 for s in survivors) or survivors != sorted(survivors, reverse=True) \
            or survivors[0] > offspring:
        raise ValueError(f"selection survivors must fall to 1 and start at most at the offspring ({offspring}); "
                         f"got {survivors}")
    if any(t < 1 for t in tokens) or tokens != sorted(tokens):
        raise ValueError(f"selection tokens must be positive and grow step by step; got {tokens}")


def parse_selection(text: str) -> tuple[tuple[int, int], ...]:
    """'4:256,1:1024' -> ((4, 256), (1, 1024)): survivors:tokens per step."""
    try:
        steps = tuple(tuple(int(x) for x in part.split(":")) for part in text.split(",") if part.strip())
        if not steps or any(len(s) != 2 for s in steps):
            raise ValueError
    except ValueError:
        raise ValueError(f"bad selection {text!r}; allowed: survivors:tokens per step, e.g. 4:256,1:1024") from None
    return steps
