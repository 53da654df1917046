"""Item sets built to leak, one artefact each, for checking that the adversaries find what they should.

Each set is text only (release-layout records whose image paths name files that need not exist; curate
them without ``--images``) and carries exactly one planted artefact, the others kept at chance:

* ``longest``: the key is always the longest option (letters balanced, overlaps unrelated to the key);
* ``hub``: every distractor differs from the key in exactly one of three features, so the key is the
  option most similar to all the others (DESIGN.md §3); feature words are drawn from pools with
  varied lengths, so length does not point at the key, and letters are balanced;
* ``letter``: the key is always option A; options are independent draws from one pool.

Five questions (types A-E) per view triplet, a few triplets per slide, as in the release.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np

from scalereasoner_jax.data.schema import QUESTION_TYPES

__all__ = ["LEAK_KINDS", "make_leaky_set"]

LEAK_KINDS: tuple[str, ...] = ("longest", "hub", "letter")

_ARCH = (
    "glandular",
    "solid",
    "papillary",
    "cribriform",
    "trabecular",
    "micropapillary",
    "nested",
    "lepidic",
    "tubular",
    "acinar",
)
_NUC = (
    "vesicular",
    "hyperchromatic",
    "pleomorphic",
    "monotonous",
    "spindled",
    "clear",
    "bizarre",
    "grooved",
    "round",
    "angulated",
)
_STROMA = (
    "desmoplastic",
    "myxoid",
    "hyalinised",
    "inflamed",
    "oedematous",
    "sclerotic",
    "fibrous",
    "loose",
    "cellular",
    "vascular",
)
_EXTRA = (
    "with scattered apoptotic bodies and focal necrosis",
    "together with brisk mitotic activity in several fields",
    "and an infiltrative border into the adjacent fat",
    "plus lymphovascular invasion near the periphery",
    "with prominent nucleoli and abundant eosinophilic cytoplasm",
    "and a dense lymphoid cuff at the advancing edge",
)
_QUESTIONS = {
    "type_A": "Which description corresponds to this region at both magnifications?",
    "type_B": "Which findings do the low and high magnification views confirm?",
    "type_C": "Which option describes the field around the high magnification site?",
    "type_D": "Which explanation of the appearance is supported by both views?",
    "type_E": "Which diagnosis best fits the lesion?",
}
_LETTERS = ("A", "B", "C", "D")


def _phrase(a: str, n: str, s: str) -> str:
    return f"{a} growth, {n} nuclei, {s} stroma"


def _balanced_slots(rng: np.random.Generator, n: int) -> list[int]:
    return np.concatenate([rng.permutation(4) for _ in range(-(-n // 4))])[:n].tolist()


def _options(kind: str, rng: np.random.Generator, slot: int) -> tuple[list[str], int]:
    """Four option texts and the key's position."""
    if kind == "hub":
        key = [str(rng.choice(pool)) for pool in (_ARCH, _NUC, _STROMA)]
        distractors = []
        for f, pool in enumerate((_ARCH, _NUC, _STROMA)):
            d = list(key)
            d[f] = str(rng.choice([w for w in pool if w != key[f]]))
            distractors.append(_phrase(*d))
        order = rng.permutation(3)
        texts = [distractors[i] for i in order]
        texts.insert(slot, _phrase(*key))
        return texts, slot
    # Four distinct combinations drawn independently (no shared structure around the key).
    seen: set[str] = set()
    texts = []
    while len(texts) < 4:
        t = _phrase(str(rng.choice(_ARCH)), str(rng.choice(_NUC)), str(rng.choice(_STROMA)))
        if t not in seen:
            seen.add(t)
            texts.append(t)
    if kind == "longest":
        texts[slot] = f"{texts[slot]} {rng.choice(_EXTRA)}"
        return texts, slot
    if kind == "letter":
        return texts, 0
    raise ValueError(f"unknown leak kind {kind!r}; one of {', '.join(LEAK_KINDS)}")


def make_leaky_set(
    kind: str, n_triplets: int = 24, seed: int = 0, triplets_per_slide: int = 2
) -> list[dict[str, Any]]:
    """``5 * n_triplets`` release-layout records carrying the artefact ``kind`` (see the module doc)."""
    if kind not in LEAK_KINDS:
        raise ValueError(f"unknown leak kind {kind!r}; one of {', '.join(LEAK_KINDS)}")
    rng = np.random.default_rng([seed, LEAK_KINDS.index(kind)])
    slots = _balanced_slots(rng, n_triplets * len(QUESTION_TYPES))
    items: list[dict[str, Any]] = []
    for t in range(n_triplets):
        wsi = f"LEAK-{kind}-{t // triplets_per_slide:03d}"
        path_id = str(uuid.UUID(bytes=rng.integers(0, 256, 16, dtype=np.uint8).tobytes(), version=4))
        for qt in QUESTION_TYPES:
            no = len(items)
            texts, key = _options(kind, rng, slots[no])
            items.append(
                {
                    "question": _QUESTIONS[qt],
                    "options": dict(zip(_LETTERS, texts, strict=True)),
                    "answer": _LETTERS[key],
                    "rationale": f"The views show {texts[key]}.",
                    "No": no,
                    "image_path": {
                        "low_mag": f"images/{wsi}/{path_id}_10.png",
                        "mid_mag": f"images/{wsi}/{path_id}_40.png",
                        "high_mag": f"images/{wsi}/{path_id}_200.png",
                    },
                    "extra_info": {"wsi_name": wsi, "path_id": path_id, "question_type": qt},
                }
            )
    return items
