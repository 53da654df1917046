"""Greedy generation for evaluation: transformers ``generate`` (``hf``) or our jitted sampler (``jax``).

Both read the same Hugging Face folder, render the same chat prompt (``processing.build_messages``),
decode greedily, stop at the end-of-turn token or ``</answer>``, and return the text of the new tokens
without special tokens, so they give the same answers (tested on the tiny model).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

STOP_STRINGS = ("</answer>",)


@dataclass(frozen=True)
class Prompt:
    messages: list[dict[str, Any]]
    images: list[Any]  # PIL images or HWC uint8 arrays, in prompt order


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: int  # new tokens, the stop token included


class Backend(Protocol):
    def generate(self, prompts: Sequence[Prompt]) -> list[Generation]: ...


def _chunks(items: Sequence[Prompt], size: int) -> Iterator[Sequence[Prompt]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _eos_ids(tokenizer) -> tuple[int, ...]:
    ids = (tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id)
    return tuple(sorted({t for t in ids if t is not None and t >= 0}))


class HFBackend:
    """transformers ``generate`` on batches of left-padded prompts."""

    def __init__(self, hf_dir: str | Path, *, batch_size: int = 8, max_new_tokens: int = 256) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(str(hf_dir), local_files_only=True)
        self.model = AutoModelForImageTextToText.from_pretrained(
            str(hf_dir), dtype=torch.float32, local_files_only=True
        ).eval()
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.eos = _eos_ids(self.processor.tokenizer)

    def generate(self, prompts: Sequence[Prompt]) -> list[Generation]:
        from scalereasoner_jax.models.qwen2_5_vl.processing import _strip_images

        tok = self.processor.tokenizer
        out: list[Generation] = []
        for chunk in _chunks(prompts, self.batch_size):
            texts = [
                tok.apply_chat_template(_strip_images(p.messages), tokenize=False, add_generation_prompt=True)
                for p in chunk
            ]
            images = [img for p in chunk for img in p.images]
            inputs = self.processor(
                text=texts,
                images=images or None,
                padding=True,
                padding_side="left",
                return_tensors="pt",
            )
            with self.torch.no_grad():
                ids = self.model.generate(
                    **inputs,
                    do_sample=False,
                    max_new_tokens=self.max_new_tokens,
                    eos_token_id=list(self.eos),
                    pad_token_id=tok.pad_token_id,
                    stop_strings=list(STOP_STRINGS),
                    tokenizer=tok,
                )
            new = ids[:, inputs["input_ids"].shape[1] :].numpy()
            for row in new:
                n = _length(row, self.eos, tok.pad_token_id)
                out.append(Generation(tok.decode(row[:n], skip_special_tokens=True), n))
        return out


def _length(row: np.ndarray, eos: tuple[int, ...], pad: int) -> int:
    """New tokens up to and including the first EOS; trailing pads (finished rows) excluded."""
    for i, t in enumerate(row):
        if int(t) in eos:
            return i + 1
    n = len(row)
    while n and int(row[n - 1]) == pad:
        n -= 1
    return n


class JaxBackend:
    """Our Flax model and jitted KV-cache sampler, greedy. Prompt lengths are padded to multiples of
    ``length_multiple`` and batches to ``batch_size`` rows so that few shapes compile."""

    def __init__(
        self,
        hf_dir: str | Path,
        *,
        batch_size: int = 8,
        max_new_tokens: int = 256,
        length_multiple: int = 128,
    ) -> None:
        from flax import nnx

        from scalereasoner_jax.models.qwen2_5_vl import from_pretrained
        from scalereasoner_jax.models.qwen2_5_vl.processing import PromptEncoder
        from scalereasoner_jax.rl.sampler import Sampler, SamplingConfig, stop_token_sequences

        model = from_pretrained(hf_dir)
        self.state = nnx.state(model)
        self.encoder = PromptEncoder.from_pretrained(hf_dir)
        tok = self.encoder.tokenizer
        self.sampler = Sampler(
            model,
            SamplingConfig(
                max_new_tokens=max_new_tokens,
                eos_token_ids=_eos_ids(tok),
                pad_token_id=tok.pad_token_id,
                greedy=True,
                stop_sequences=stop_token_sequences(tok, STOP_STRINGS),
            ),
        )
        self.batch_size, self.length_multiple = batch_size, length_multiple

    def _batch(self, chunk: Sequence[Prompt]) -> dict[str, np.ndarray]:
        rows = list(chunk) + [chunk[0]] * (self.batch_size - len(chunk))  # fixed batch: one compile
        batch = self.encoder.batch([(p.messages, p.images) for p in rows])
        length = batch["input_ids"].shape[1]
        pad = -length % self.length_multiple
        if pad:  # left padding: every prompt still ends at the last column
            pad_id = self.encoder.tokenizer.pad_token_id
            for key, value in (("input_ids", pad_id), ("attention_mask", 0), ("mm_token_type_ids", 0)):
                batch[key] = np.pad(batch[key], ((0, 0), (pad, 0)), constant_values=value)
        return batch

    def generate(self, prompts: Sequence[Prompt]) -> list[Generation]:
        import jax

        tok = self.encoder.tokenizer
        out: list[Generation] = []
        for chunk in _chunks(prompts, self.batch_size):
            rollout = self.sampler.generate(self.state, self._batch(chunk), 1, jax.random.key(0))
            for row, n in list(zip(rollout.tokens, rollout.lengths, strict=True))[: len(chunk)]:
                out.append(Generation(tok.decode(row[: int(n)], skip_special_tokens=True), int(n)))
        return out


def make_backend(name: str, hf_dir: str | Path, **kwargs: Any) -> Backend:
    if name == "hf":
        return HFBackend(hf_dir, **kwargs)
    if name == "jax":
        return JaxBackend(hf_dir, **kwargs)
    raise ValueError(f"unknown backend {name!r}: use 'hf' or 'jax'")
