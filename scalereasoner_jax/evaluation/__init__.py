"""Evaluation of a Hugging Face folder (or an exported checkpoint) on a Scale-VQA split, with ablations."""

from scalereasoner_jax.evaluation.extraction import Extraction, extract_choice
from scalereasoner_jax.evaluation.metrics import summarize, wilson_interval

__all__ = ["Extraction", "extract_choice", "summarize", "wilson_interval"]
