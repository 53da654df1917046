"""ScaleReasoner-JAX: cross-scale reasoning for pathology VLMs on JAX."""
