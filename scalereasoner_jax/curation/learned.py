"""A learned text-only solver: a conditional logit over each item's options, cross-validated by slide.

Each option is described by features of its text and of its place among the other options:

* TF-IDF of the option's words and word pairs (vocabulary and IDF fitted on the training folds only);
* its length in characters and words, its mean word-Jaccard overlap with the other options (the hub
  artefact of DESIGN.md §3), its overlap and TF-IDF cosine with the question, how many magnification
  words it holds — each standardised *within the item*, since only differences between an item's
  options can point at the key — plus whether it is the longest, shortest, hub or most question-like
  option (1/t when t options tie, so a tie carries no signal), and its position (one-hot letter).

The score of an option is linear in its features and the item's options compete in a softmax
(McFadden's conditional logit), fitted by L-BFGS with an L2 penalty. Folds are grouped by slide
(:mod:`scalereasoner_jax.curation.folds`), so the accuracy measures what carries over to unseen slides.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from scalereasoner_jax.curation.adversaries import AdversaryResult, tie_credit
from scalereasoner_jax.curation.folds import grouped_folds
from scalereasoner_jax.curation.text import MAGNIFICATION_WORDS, content_words, jaccard, word_set, words

if TYPE_CHECKING:
    import scipy.sparse as sp
from scalereasoner_jax.data.schema import ScaleVQARecord

__all__ = ["DENSE_FEATURES", "learned_solver"]

_WITHIN_ITEM = ("len_chars", "len_words", "hub_overlap", "question_overlap", "question_cosine", "mag_words")
_TIE_FLAGS = ("is_longest", "is_shortest", "is_hub", "is_most_question_like")
DENSE_FEATURES: tuple[str, ...] = _WITHIN_ITEM + _TIE_FLAGS  # followed by one position feature per letter


def _terms(text: str) -> list[str]:
    w = words(text)
    return w + [f"{a} {b}" for a, b in itertools.pairwise(w)]


class _Tfidf:
    """Smoothed TF-IDF (sublinear tf, L2-normalised rows) over words and word pairs of option texts."""

    def __init__(self, docs: Sequence[str], min_df: int, max_features: int):
        df = Counter(t for d in docs for t in set(_terms(d)))
        kept = sorted((t for t, c in df.items() if c >= min_df), key=lambda t: (-df[t], t))[:max_features]
        self.vocab = {t: i for i, t in enumerate(sorted(kept))}
        n = len(docs)
        self.idf = np.array([math.log((1 + n) / (1 + df[t])) + 1.0 for t in sorted(kept)])

    def transform(self, docs: Sequence[str]) -> sp.csr_matrix:
        rows, cols, vals = [], [], []
        for r, d in enumerate(docs):
            tf = Counter(t for t in _terms(d) if t in self.vocab)
            if not tf:
                continue
            idx = np.array([self.vocab[t] for t in tf])
            v = np.array([1.0 + math.log(c) for c in tf.values()]) * self.idf[idx]
            v /= np.linalg.norm(v)
            rows += [r] * len(idx)
            cols += idx.tolist()
            vals += v.tolist()
        import scipy.sparse as sp  # scipy is imported on use: the CLI must start fast

        return sp.csr_matrix((vals, (rows, cols)), shape=(len(docs), len(self.vocab)))


def _tie_flag(x: np.ndarray) -> np.ndarray:
    top = np.isclose(x, x.max(), rtol=1e-9, atol=1e-12)
    return top / top.sum()


def _zscore(x: np.ndarray) -> np.ndarray:
    sd = x.std()
    return (x - x.mean()) / sd if sd > 1e-12 else np.zeros_like(x)


def _features(
    records: Sequence[ScaleVQARecord], tfidf: _Tfidf, n_pos: int
) -> tuple[sp.csr_matrix, np.ndarray]:
    """(TF-IDF rows, dense features) per option, rows in item order then option order."""
    texts = [t for r in records for t in r.options.values()]
    sizes = [len(r.options) for r in records]
    o_vec = tfidf.transform(texts)
    q_vec = tfidf.transform([r.question for r in records])[np.repeat(np.arange(len(records)), sizes)]
    cosine = np.asarray(o_vec.multiply(q_vec).sum(axis=1)).ravel()
    out = []
    row = 0
    for rec, k in zip(records, sizes, strict=True):
        opts = texts[row : row + k]
        sets = [word_set(t) for t in opts]
        q_set = content_words(rec.question)
        raw = {
            "len_chars": np.array([len(t) for t in opts], float),
            "len_words": np.array([len(s) for s in sets], float),
            "hub_overlap": np.array(
                [np.mean([jaccard(sets[i], sets[j]) for j in range(k) if j != i]) for i in range(k)]
            ),
            "question_overlap": np.array([len(q_set & content_words(t)) for t in opts], float),
            "question_cosine": cosine[row : row + k],
            "mag_words": np.array([len(MAGNIFICATION_WORDS.findall(t)) for t in opts], float),
        }
        row += k
        cols = [_zscore(raw[f]) for f in _WITHIN_ITEM]
        cols += [
            _tie_flag(raw["len_chars"]),
            _tie_flag(-raw["len_chars"]),
            _tie_flag(raw["hub_overlap"]),
            _tie_flag(raw["question_overlap"]),
        ]
        pos = np.zeros((k, n_pos))
        pos[np.arange(k), np.arange(k)] = 1.0
        out.append(np.column_stack([*cols, pos]))
    return o_vec, np.vstack(out)


class _ConditionalLogit:
    """Softmax over each item's options of a linear score; L2-penalised negative log-likelihood."""

    def __init__(self, l2: float):
        self.l2 = l2
        self.w: np.ndarray | None = None

    @staticmethod
    def _softmax(s: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = np.maximum.reduceat(s, starts)
        sizes = np.diff(np.append(starts, len(s)))
        e = np.exp(s - np.repeat(m, sizes))
        z = np.add.reduceat(e, starts)
        return e / np.repeat(z, sizes), m + np.log(z)

    def fit(self, x: sp.csr_matrix, starts: np.ndarray, key_rows: np.ndarray) -> _ConditionalLogit:
        xt = x.T.tocsr()

        def f(w: np.ndarray) -> tuple[float, np.ndarray]:
            s = x @ w
            p, lse = self._softmax(s, starts)
            loss = float(lse.sum() - s[key_rows].sum() + 0.5 * self.l2 * w @ w)
            g = p.copy()
            g[key_rows] -= 1.0
            return loss, xt @ g + self.l2 * w

        from scipy.optimize import minimize

        res = minimize(f, np.zeros(x.shape[1]), jac=True, method="L-BFGS-B", options={"maxiter": 500})
        self.w = res.x
        return self

    def scores(self, x: sp.csr_matrix) -> np.ndarray:
        assert self.w is not None
        return x @ self.w


def _design(sparse: sp.csr_matrix, dense: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> sp.csr_matrix:
    import scipy.sparse as sp

    return sp.hstack([sparse, sp.csr_matrix((dense - mean) / sd)]).tocsr()


def _fit(
    records: Sequence[ScaleVQARecord], n_pos: int, l2: float, min_df: int, max_features: int
) -> tuple[_ConditionalLogit, _Tfidf, np.ndarray, np.ndarray]:
    tfidf = _Tfidf([t for r in records for t in r.options.values()], min_df, max_features)
    sparse, dense = _features(records, tfidf, n_pos)
    # Standardised on the training options only; the test fold reuses these statistics.
    mean, sd = dense.mean(0), dense.std(0)
    sd[sd < 1e-12] = 1.0
    starts, key_rows = _layout(records)
    model = _ConditionalLogit(l2).fit(_design(sparse, dense, mean, sd), starts, key_rows)
    return model, tfidf, mean, sd


def _layout(records: Sequence[ScaleVQARecord]) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.array([len(r.options) for r in records])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    key_rows = starts + np.array([list(r.options).index(r.answer) for r in records])
    return starts, key_rows


def learned_solver(
    records: Sequence[ScaleVQARecord],
    *,
    n_folds: int = 5,
    seed: int = 0,
    l2: float = 1.0,
    min_df: int = 2,
    max_features: int = 20000,
    name: str = "learned",
) -> AdversaryResult:
    """Out-of-fold answers of the conditional logit, folds grouped by ``wsi_name``.

    ``details`` holds the folds, the feature count and, from one fit on all items, the dense feature
    weights and the words most in favour of an option (what the solver found, for the report).
    """
    groups = [r.wsi_name for r in records]
    if len(set(groups)) < 2:
        return AdversaryResult.skip(
            name, "fitted", "published", f"needs items from at least 2 slides, got {len(set(groups))}"
        )
    n_pos = max(len(r.options) for r in records)
    folds = grouped_folds(groups, n_folds, seed)
    n = len(records)
    answers: list[str | None] = [None] * n
    credit = np.zeros(n)
    votes = np.zeros(n, dtype=bool)
    for f in range(int(folds.max()) + 1):
        train = [records[i] for i in np.flatnonzero(folds != f)]
        test_idx = np.flatnonzero(folds == f)
        test = [records[i] for i in test_idx]
        model, tfidf, mean, sd = _fit(train, n_pos, l2, min_df, max_features)
        s = model.scores(_design(*_features(test, tfidf, n_pos), mean, sd))
        starts, _ = _layout(test)
        for j, i in enumerate(test_idx):
            keys = list(records[i].options)
            lo = starts[j]
            c, unique, first = tie_credit(s[lo : lo + len(keys)], keys.index(records[i].answer))
            credit[i], votes[i], answers[i] = c, unique, keys[first]
    details = _explain(records, n_pos, l2, min_df, max_features)
    details.update(folds=int(folds.max()) + 1, fold_sizes=np.bincount(folds).tolist(), l2=l2)
    return AdversaryResult(name, "fitted", "published", answers, credit, votes, details=details)


def _explain(
    records: Sequence[ScaleVQARecord], n_pos: int, l2: float, min_df: int, max_features: int
) -> dict[str, Any]:
    model, tfidf, _, _ = _fit(records, n_pos, l2, min_df, max_features)
    assert model.w is not None
    v = len(tfidf.vocab)
    names = [*DENSE_FEATURES, *(f"position_{chr(65 + i)}" for i in range(n_pos))]
    dense_w = dict(zip(names, np.round(model.w[v:], 4).tolist(), strict=True))
    terms = sorted(tfidf.vocab, key=tfidf.vocab.__getitem__)
    order = np.argsort(-model.w[:v])[:10]
    return {
        "n_features": v + len(names),
        "dense_weights": dense_w,
        "top_terms": [[terms[i], round(float(model.w[i]), 4)] for i in order if model.w[i] > 0],
    }
