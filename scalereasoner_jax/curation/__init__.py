"""Leakage-aware curation of Scale-VQA items: text-only adversaries, constraint checks, remediation, report.

Entry point: :func:`scalereasoner_jax.curation.pipeline.curate` (the ``scalereasoner curate`` command).
Nothing here sees an image; heavy imports (torch, transformers) happen only for LM adversaries.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CurationConfig", "curate"]


def __getattr__(name: str) -> Any:
    # Lazy: the pipeline pulls in scipy.optimize, and the CLI imports this package to build its parser.
    if name in __all__:
        from scalereasoner_jax.curation import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
