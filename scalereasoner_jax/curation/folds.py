"""Cross-validation folds grouped by slide (``wsi_name``).

One slide carries many questions that share wording, findings and often answers; splitting by item
would let a text-only solver memorise a slide and score what does not generalise. The release splits
by slide for the same reason (DESIGN.md §3).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

__all__ = ["grouped_folds"]


def grouped_folds(groups: Sequence[str], n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold id (0..F-1) per item, no group split across folds, F = min(n_folds, number of groups).

    Groups are shuffled by ``seed`` and then placed largest first into the fold holding the fewest
    items, so folds are close in size and deterministic.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    sizes = Counter(groups)
    if len(sizes) < 2:
        raise ValueError(f"grouped cross-validation needs at least 2 groups (slides), got {len(sizes)}")
    names = sorted(sizes)
    rng = np.random.default_rng(seed)
    names = [names[i] for i in rng.permutation(len(names))]
    names.sort(key=lambda g: -sizes[g])  # stable: equal sizes keep the seeded order
    n_f = min(n_folds, len(names))
    load = [0] * n_f
    fold_of: dict[str, int] = {}
    for g in names:
        f = min(range(n_f), key=lambda i: (load[i], i))
        fold_of[g] = f
        load[f] += sizes[g]
    return np.array([fold_of[g] for g in groups], dtype=np.int64)
