"""Leakage-aware curation of Scale-VQA items: text-only adversaries, constraint checks, remediation, report.

Entry point: :func:`scalereasoner_jax.curation.pipeline.curate` (the ``scalereasoner curate`` command).
Nothing here sees an image; heavy imports (torch, transformers) happen only for LM adversaries.
"""

from scalereasoner_jax.curation.pipeline import CurationConfig, curate

__all__ = ["CurationConfig", "curate"]
