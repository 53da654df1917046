"""The language-model adversary: a causal LM (or our VLM) answers from the text alone, under CircularEval.

For every item and every cyclic rotation of its options, the model reads the question and the options
(no image) and we take its next-token distribution over the option letters — the letter-scoring
protocol of MMLU-style evaluations, which needs no free-form generation and so also works for small or
untuned models. ``k`` letters are sampled from that distribution (temperature ``T``; ``T = 0`` is
greedy) and the hits — samples equal to the key — are recorded per rotation. The model answers an item
when a strict majority of the ``k`` samples is right under every rotation; its accuracy on the
evaluated order is the hit rate of rotation 0.

A letter that the tokenizer merges with the text before it (e.g. ``>B`` after ``<answer>``) is scored as
the log-likelihood of its whole continuation after the longest token prefix shared by all letters, so
any tokenizer works; the common case (each letter one token) costs one forward pass per prompt.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scalereasoner_jax.curation.adversaries import AdversaryResult
from scalereasoner_jax.curation.text import rotate, rotated_key
from scalereasoner_jax.data.schema import ScaleVQARecord

__all__ = [
    "DEFAULT_INSTRUCTION",
    "HFLetterScorer",
    "LetterScorer",
    "circular_lm_eval",
    "lm_prompt",
]

# The standard multiple-choice instruction of Qwen-VL / LLaVA evaluations: the reply starts with the letter.
DEFAULT_INSTRUCTION = "Answer with the option's letter from the given choices directly."

# (question, options in order) per prompt -> log-probabilities over that prompt's option letters.
LetterScorer = Callable[[Sequence[tuple[str, Mapping[str, str]]]], list[np.ndarray]]


def lm_prompt(question: str, options: Mapping[str, str], instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The text the model reads: question, ``Options:``, one ``A. text`` line per option, instruction."""
    lines = [question, "Options:", *(f"{k}. {v}" for k, v in options.items())]
    return "\n".join([*lines, instruction])


@dataclasses.dataclass
class _Job:
    ids: list[int]  # the sequence to run
    targets: list[tuple[int, int]]  # (position of the token in ids, token id) whose log-probs are summed


class HFLetterScorer:
    """Letter log-probabilities from a Hugging Face folder, text only, batched with right padding.

    Right padding keeps every row's positions 0..n-1 (no position-id handling per architecture) and a
    causal model never attends to the pads after a row's last token. Only safetensors weights are
    loaded (no pickles) and no remote code runs.
    """

    def __init__(
        self,
        hf_dir: str | Path,
        *,
        device: str = "auto",
        dtype: str = "float32",
        batch_size: int = 8,
        instruction: str = DEFAULT_INSTRUCTION,
        answer_prefix: str = "",
    ):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        )

        hf_dir = Path(hf_dir)
        if not (hf_dir / "config.json").is_file():
            raise FileNotFoundError(f"LM adversary: {hf_dir} is not a Hugging Face folder (no config.json)")
        if batch_size < 1:
            raise ValueError(f"LM adversary: batch_size must be positive, got {batch_size}")
        config = AutoConfig.from_pretrained(hf_dir)
        if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            auto = AutoModelForCausalLM
        elif config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            auto = AutoModelForImageTextToText  # our VLM (Qwen2.5-VL): run on text tokens only
        else:
            raise ValueError(
                f"LM adversary: {hf_dir}: model_type {config.model_type!r} is neither a causal LM nor an "
                "image-text-to-text model"
            )
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.torch = torch
        self.device = device
        self.model = auto.from_pretrained(hf_dir, dtype=getattr(torch, dtype), use_safetensors=True)
        self.model.to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        self.batch_size = batch_size
        self.instruction = instruction
        self.answer_prefix = answer_prefix
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))
        self.name = hf_dir.name

    def context(self, question: str, options: Mapping[str, str]) -> tuple[str, str]:
        """(text before the answer letter, separator before the letter)."""
        text = lm_prompt(question, options, self.instruction)
        if self.chat:
            messages = [{"role": "user", "content": text}]
            prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return prompt + self.answer_prefix, ""
        return f"{text}\nAnswer:{self.answer_prefix}", " "

    def _encode(self, text: str) -> list[int]:
        # A chat template already holds its special tokens; a plain prompt gets the model's BOS, if any.
        return list(self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"])

    def _jobs(self, question: str, options: Mapping[str, str]) -> list[tuple[_Job, list[int]]]:
        """Forward passes for one prompt, each with the letter indices its targets belong to."""
        ctx, sep = self.context(question, options)
        seqs = [self._encode(ctx + sep + letter) for letter in options]
        common = 0
        while all(common < len(s) for s in seqs) and len({s[common] for s in seqs}) == 1:
            common += 1
        if common == 0:
            raise ValueError("LM adversary: the option letters share no prompt tokens (tokenizer problem)")
        if all(len(s) == common + 1 for s in seqs):
            # Fast path: each letter is one token after a shared context: one pass, all letters.
            job = _Job(seqs[0][:common], [(common, s[common]) for s in seqs])
            return [(job, list(range(len(seqs))))]
        return [(_Job(s, [(p, s[p]) for p in range(common, len(s))]), [j]) for j, s in enumerate(seqs)]

    def __call__(self, prompts: Sequence[tuple[str, Mapping[str, str]]]) -> list[np.ndarray]:
        torch = self.torch
        out = [np.zeros(len(opts)) for _, opts in prompts]
        work: list[tuple[int, _Job, list[int]]] = []
        for i, (q, opts) in enumerate(prompts):
            work += [(i, job, letters) for job, letters in self._jobs(q, opts)]
        order = sorted(range(len(work)), key=lambda w: len(work[w][1].ids))
        for start in range(0, len(order), self.batch_size):
            batch = [work[w] for w in order[start : start + self.batch_size]]
            width = max(len(job.ids) for _, job, _ in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, (_, job, _) in enumerate(batch):
                ids[b, : len(job.ids)] = torch.tensor(job.ids)
                mask[b, : len(job.ids)] = 1
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for b, (i, job, letters) in enumerate(batch):
                n = len(job.ids)
                if len(letters) > 1:  # fast path: every target is read at the last real position
                    lp = torch.log_softmax(logits[b, n - 1].float(), -1)
                    for j, (_, tok) in zip(letters, job.targets, strict=True):
                        out[i][j] = float(lp[tok])
                else:
                    total = 0.0
                    for pos, tok in job.targets:  # token at pos is predicted at pos - 1
                        total += float(torch.log_softmax(logits[b, pos - 1].float(), -1)[tok])
                    out[i][letters[0]] = total
        return out


def _sample(logp: np.ndarray, samples: int, temperature: float, rng: np.random.Generator) -> np.ndarray:
    if temperature <= 0:
        return np.full(samples, int(np.argmax(logp)))
    z = logp / temperature
    p = np.exp(z - z.max())
    return rng.choice(len(p), size=samples, p=p / p.sum())


def circular_lm_eval(
    records: Sequence[ScaleVQARecord],
    scorer: LetterScorer,
    *,
    samples: int = 5,
    temperature: float = 1.0,
    seed: int = 0,
    name: str = "lm",
) -> AdversaryResult:
    """Every item under every cyclic rotation of its options, ``samples`` letters each; hits recorded.

    The sampling stream of (item, rotation) is ``default_rng([seed, item index, rotation])``, so the result
    does not depend on batching or on which other items are in the set.
    """
    if samples < 1:
        raise ValueError(f"LM adversary: samples must be at least 1, got {samples}")
    prompts: list[tuple[str, dict[str, str]]] = []
    where: list[tuple[int, int]] = []
    for i, rec in enumerate(records):
        for r in range(len(rec.options)):
            prompts.append((rec.question, rotate(rec.options, r)))
            where.append((i, r))
    logps = scorer(prompts)
    n = len(records)
    hits: list[list[int]] = [[0] * len(rec.options) for rec in records]
    p_key = [[0.0] * len(rec.options) for rec in records]
    answers: list[str | None] = [None] * n
    picked: Counter[str] = Counter()
    for (i, r), logp in zip(where, logps, strict=True):
        keys = list(records[i].options)
        key = keys.index(rotated_key(records[i].answer, keys, r))
        draws = _sample(
            np.asarray(logp, dtype=np.float64), samples, temperature, np.random.default_rng([seed, i, r])
        )
        hits[i][r] = int((draws == key).sum())
        probs = np.exp(logp - np.max(logp))
        p_key[i][r] = float(probs[key] / probs.sum())
        counts = np.bincount(draws, minlength=len(keys))
        picked.update(keys[j] for j in draws.tolist())
        if r == 0:
            answers[i] = keys[int(np.argmax(counts))]
    credit = np.array([h[0] / samples for h in hits]) if n else np.zeros(0)
    votes = np.array([all(2 * h > samples for h in row) for row in hits], dtype=bool)
    details: dict[str, Any] = {
        "samples": samples,
        "temperature": temperature,
        "rotations": "all cyclic rotations of each item's options",
        "mean_p_key": float(np.mean([np.mean(p) for p in p_key])) if n else None,
        # A strong letter preference across rotations is position bias, which CircularEval cancels.
        "picked_letters": dict(sorted(picked.items())),
    }
    return AdversaryResult(name, "lm", "circular", answers, credit, votes, hits, samples, details=details)
