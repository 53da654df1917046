"""Logit parity between transformers and our model on the same processed multi-image prompt.

This check gates every export: both models load the same folder, the Hugging Face processor prepares
one prompt with several images, and we compare the logits at every real token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# fp32: largest |difference| relative to the largest |logit|; bf16: mean KL(HF || ours) per token.
THRESHOLDS = {"float32": ("max_rel_diff", 1e-4), "bfloat16": ("mean_kl", 1e-3)}
DEFAULT_PROMPT = "Compare the tissue architecture across these magnifications."


@dataclasses.dataclass(frozen=True)
class ParityReport:
    dtype: str
    n_tokens: int
    n_images: int
    max_abs_diff: float
    max_rel_diff: float
    mean_kl: float
    argmax_agreement: float
    metric: str
    threshold: float

    @property
    def passed(self) -> bool:
        return getattr(self, self.metric) <= self.threshold

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"parity {verdict} ({self.dtype}, {self.n_images} images, {self.n_tokens} tokens): "
            f"max |diff| = {self.max_abs_diff:.3e}, relative to max |logit| = {self.max_rel_diff:.3e}, "
            f"mean KL(HF||ours) = {self.mean_kl:.3e}, argmax agreement = {self.argmax_agreement:.4f}; "
            f"gate: {self.metric} <= {self.threshold:g}"
        )


def probe_images(seed: int = 0) -> list:
    """Three deterministic images of different sizes (one not square) when the user gives none."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(96, 96), (140, 84), (64, 120)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def compare_logits(
    hf_logits: np.ndarray, our_logits: np.ndarray, mask: np.ndarray, dtype: str
) -> ParityReport:
    """Compare (B, S, V) logits at the positions where ``mask`` is 1."""
    keep = mask.astype(bool)
    p = hf_logits[keep].astype(np.float64)
    q = our_logits[keep].astype(np.float64)
    diff = np.abs(p - q).max()
    logp = p - _logsumexp(p)
    logq = q - _logsumexp(q)
    kl = (np.exp(logp) * (logp - logq)).sum(-1)
    metric, threshold = THRESHOLDS[dtype]
    return ParityReport(
        dtype=dtype,
        n_tokens=int(keep.sum()),
        n_images=0,
        max_abs_diff=float(diff),
        max_rel_diff=float(diff / max(np.abs(p).max(), 1e-30)),
        mean_kl=float(kl.mean()),
        argmax_agreement=float((p.argmax(-1) == q.argmax(-1)).mean()),
        metric=metric,
        threshold=threshold,
    )


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


def processed_prompt(hf_dir: str | Path, images: Sequence, prompt: str) -> dict:
    """The HF processor's output for a chat turn holding ``images`` then ``prompt``."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(hf_dir))
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return dict(processor(text=[text], images=list(images) or None, return_tensors="pt"))


def run_parity(
    hf_dir: str | Path,
    images: Sequence[str | Path] | None = None,
    prompt: str = DEFAULT_PROMPT,
    dtype: str = "float32",
    our_model=None,
) -> ParityReport:
    """Load ``hf_dir`` in transformers and (unless ``our_model`` is given) in JAX; compare logits."""
    import jax.numpy as jnp
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from scalereasoner_jax.models.qwen2_5_vl.params import from_pretrained

    if dtype not in THRESHOLDS:
        raise ValueError(f"dtype must be one of {sorted(THRESHOLDS)}, got {dtype!r}")
    pil = [Image.open(p).convert("RGB") for p in images] if images else probe_images()
    inputs = processed_prompt(hf_dir, pil, prompt)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    hf = AutoModelForImageTextToText.from_pretrained(str(hf_dir), dtype=torch_dtype).eval()
    with torch.no_grad():
        hf_logits = hf(**inputs).logits.float().numpy()
    del hf
    if our_model is None:
        our_model = from_pretrained(hf_dir, dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype])
    ours = np.asarray(our_model(**inputs).logits.astype(jnp.float32))
    report = compare_logits(hf_logits, ours, inputs["attention_mask"].numpy(), dtype)
    return dataclasses.replace(report, n_images=len(pil))
