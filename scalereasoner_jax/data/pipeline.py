"""The Grain input pipeline: packaged examples -> model-ready, fixed-shape batches.

    source (tfds.data_source or any random-access sequence of examples)
      -> shuffle (seeded; reseeded every epoch) -> repeat
      -> option shuffling (training augmentation, seeded per example) -> this process's shard
      -> prompt of DESIGN.md §3 through the chat template, image processing as the model's processor
      -> batches left-padded to a few fixed length buckets (jit compiles once per bucket)
      -> (several processes) the global batch: every process's batch, gathered on every process

The iterator is checkpointable: ``it.get_state()`` / ``it.set_state(state)`` give the same next batches.

Multi-process: process ``p`` of ``n`` reads, decodes and tokenises only its own examples: blocks of
``batch_size`` consecutive examples of the shuffled stream, so that process ``p``'s k-th batch is the
``p``-th slice of the global batch k. The processes then exchange their compact batches (token ids and
uint8 views), pad them to a common length and patchify, so every process holds the same global batch,
identical to the batch one process with ``batch_size x n`` would have made. The sampler and the
trainer prepare model inputs (positions, vision windows) on the host from the whole batch, and jitted
functions take host inputs as replicated, which requires them to be the same on every process.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
import PIL.Image

from scalereasoner_jax.models.qwen2_5_vl.processing import (
    DEFAULT_INSTRUCTION,
    ImageProcessor,
    PromptEncoder,
    build_messages,
    tokenize_prompt,
)

QUESTION_TYPES = ("type_A", "type_B", "type_C", "type_D", "type_E")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1  # None: repeat forever
    length_buckets: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)
    drop_remainder: bool = True
    shuffle_options: bool = False  # augmentation: permute option texts, remap the answer
    drop_images: bool = False  # the same prompt without its images (ablations, blind evaluation)
    instruction: str = DEFAULT_INSTRUCTION
    worker_count: int = 0  # Grain worker processes (0: in this process)
    read_threads: int = 0  # Grain reader threads per process


class PipelineError(ValueError):
    """An example the pipeline cannot turn into a batch; the message names it."""


def _text(x: Any) -> str:
    if isinstance(x, bytes | np.bytes_):
        return bytes(x).decode("utf-8")
    if isinstance(x, np.ndarray) and x.ndim == 0:
        return _text(x.item())
    return str(x)


def _options(raw: Any) -> dict[str, str]:
    """TFDS gives a Sequence of dicts as a dict of lists; accept a list of dicts or a mapping too."""
    if isinstance(raw, Mapping) and set(raw) == {"letter", "text"}:
        return {_text(k): _text(v) for k, v in zip(raw["letter"], raw["text"], strict=True)}
    if isinstance(raw, Mapping):
        return {_text(k): _text(v) for k, v in raw.items()}
    return {_text(o["letter"]): _text(o["text"]) for o in raw}


def _image(x: Any) -> PIL.Image.Image | np.ndarray:
    if isinstance(x, bytes | np.bytes_):
        return PIL.Image.open(io.BytesIO(bytes(x)))
    return np.asarray(x)


def _question_type(x: Any) -> str:
    if isinstance(x, int | np.integer):
        return QUESTION_TYPES[int(x)]
    return _text(x)


def normalize_example(example: Mapping[str, Any]) -> dict[str, Any]:
    """A packaged example (TFDS features of the Scale-VQA builder) as plain Python values."""
    return {
        "id": _text(example["id"]),
        "question": _text(example["question"]),
        "options": _options(example["options"]),
        "answer": _text(example["answer"]),
        "rationale": _text(example.get("rationale", "")),
        "question_type": _question_type(example["question_type"]),
        "images": [_image(x) for x in example["images"]],
        "magnifications": [_text(m) for m in example.get("magnifications", [])],
    }


def shuffle_options(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Permute the option texts over the same letters and move the answer with its text."""
    letters = list(example["options"])
    texts = [example["options"][k] for k in letters]
    order = rng.permutation(len(texts))
    key_text = example["options"][example["answer"]]
    options = {letter: texts[i] for letter, i in zip(letters, order, strict=True)}
    answer = next(letter for letter, text in options.items() if text == key_text)
    return {**example, "options": options, "answer": answer}


def encode_example(example: dict[str, Any], encoder: PromptEncoder, config: PipelineConfig) -> dict[str, Any]:
    """Tokens and resized uint8 views for one normalised example (the expensive, per-example work)."""
    images = [] if config.drop_images else example["images"]
    messages = build_messages(
        example["question"], example["options"], len(images), instruction=config.instruction
    )
    processor = encoder.image_processor
    try:
        resized = [processor.resize(img, i) for i, img in enumerate(images)]
        grids = np.array([processor.grid(r) for r in resized], np.int32).reshape(-1, 3)
        tokens = tokenize_prompt(encoder.tokenizer, messages, grids, processor.merge_size)
    except Exception as err:
        raise PipelineError(f"example {example['id']}: {err}") from err
    return {
        "input_ids": tokens["input_ids"][0].astype(np.int32),
        "id": example["id"],
        "answer": example["answer"],
        "rationale": example.get("rationale", ""),
        "options": "".join(example["options"]),
        "question_type": QUESTION_TYPES.index(example["question_type"]),
        "images": resized,
        "image_grid_thw": grids,
    }


def patchify_batch(batch: dict[str, Any], processor: ImageProcessor) -> dict[str, Any]:
    """Resized uint8 views -> the model's ``pixel_values``: cheap and vectorised, so it runs after the
    worker processes and only compact uint8 images cross process boundaries."""
    batch = dict(batch)
    images = batch.pop("images")
    if images:
        batch["pixel_values"] = np.concatenate([processor.patchify(img)[0] for img in images])
    else:
        del batch["image_grid_thw"]
    return batch


def bucket_length(length: int, buckets: Sequence[int], what: str = "prompt") -> int:
    for b in sorted(buckets):
        if length <= b:
            return b
    raise PipelineError(f"{what} of {length} tokens is longer than the largest length bucket {max(buckets)}")


def collate(items: Sequence[dict[str, Any]], pad_id: int, buckets: Sequence[int]) -> dict[str, np.ndarray]:
    """Left-pad a list of encoded examples to the smallest bucket that fits them all; the views of all
    examples are listed in order (``patchify_batch`` turns them into ``pixel_values``)."""
    longest = max(len(x["input_ids"]) for x in items)
    ids_of_longest = [x["id"] for x in items if len(x["input_ids"]) == longest]
    length = bucket_length(longest, buckets, what=f"example {ids_of_longest[0]}'s prompt")
    input_ids = np.full((len(items), length), pad_id, np.int32)
    attention_mask = np.zeros((len(items), length), np.int32)
    for row, x in enumerate(items):
        n = len(x["input_ids"])
        input_ids[row, length - n :] = x["input_ids"]
        attention_mask[row, length - n :] = 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "id": np.array([x["id"] for x in items]),
        "answer": np.array([x["answer"] for x in items]),
        "rationale": np.array([x["rationale"] for x in items]),
        "options": np.array([x["options"] for x in items]),
        "question_type": np.array([x["question_type"] for x in items], np.int32),
        "n_images": np.array([len(x["images"]) for x in items], np.int32),
    }
    batch["images"] = [img for x in items for img in x["images"]]
    batch["image_grid_thw"] = np.concatenate([x["image_grid_thw"] for x in items])
    return batch


def make_dataset(
    source: Sequence[Mapping[str, Any]],
    encoder: PromptEncoder,
    config: PipelineConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    gather: bool | None = None,
) -> grain.IterDataset:
    """The whole pipeline for this process. ``source`` is e.g. ``tfds.data_source(...)``.

    ``config.batch_size`` is the per-process batch. With several JAX processes (and the default
    ``gather=None``) the batches are gathered: every process gets the same global batch of
    ``batch_size x process_count`` rows (collective: iterate on every process in step). ``gather=False``
    gives this process's shard only."""
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    pad_id = encoder.tokenizer.pad_token_id
    if pad_id is None:
        raise PipelineError("the tokenizer has no pad token; left padding needs one")

    ds = grain.MapDataset.source(source)
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    ds = ds.repeat(config.num_epochs)
    ds = ds.map(normalize_example)
    if config.shuffle_options:
        # Before sharding (maps are lazy, per element): the seed of an example then does not depend on
        # the number of processes.
        ds = ds.random_map(shuffle_options, seed=config.seed + 1)
    # Every process shuffles identically, then takes its block of each global batch: disjoint shards
    # that together cover each epoch, in the order one process would read them.
    if process_count > 1:
        ds = BlockShardMapDataset(
            ds,
            block=config.batch_size,
            index=process_index,
            count=process_count,
            drop_remainder=config.drop_remainder,
        )
    # Module-level functions bound with partial: the stages must pickle for Grain worker processes.
    ds = ds.map(functools.partial(encode_example, encoder=encoder, config=config))
    ds = ds.batch(
        config.batch_size,
        drop_remainder=config.drop_remainder,
        batch_fn=functools.partial(collate, pad_id=pad_id, buckets=config.length_buckets),
    )
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=2))
    if config.worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; outside absl.app none are parsed
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
    if gather is None:
        import jax

        gather = process_count > 1 and jax.process_count() > 1
    if gather:
        it_ds = GatherIterDataset(it_ds, pad_id=pad_id)
    return it_ds.map(functools.partial(patchify_batch, processor=encoder.image_processor))


class BlockShardMapDataset(grain.MapDataset):
    """Process ``index`` of ``count``'s share of ``parent``: blocks of ``block`` consecutive elements,
    one in every ``count``. Element ``i`` is ``parent[(i // block) * block * count + index * block +
    i % block]``. With ``drop_remainder`` a last round of blocks that would not fill every process's
    block is left out on all processes (so all of them make the same number of full batches)."""

    def __init__(self, parent: grain.MapDataset, *, block: int, index: int, count: int, drop_remainder: bool):
        super().__init__(parent)
        if block < 1 or not 0 <= index < count:
            raise ValueError(
                f"block shard: need block >= 1 and 0 <= index < count, got {block}, {index}, {count}"
            )
        self._block, self._index, self._count = block, index, count
        self._parent_length = len(parent)
        rounds, rest = divmod(self._parent_length, block * count)
        tail = 0 if drop_remainder else min(max(rest - index * block, 0), block)
        self._length = rounds * block + tail

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, i: int) -> int:
        epoch, i = divmod(i, max(self._length, 1))  # MapDataset convention: indices past the end wrap
        block, offset = divmod(i, self._block)
        local = block * self._block * self._count + self._index * self._block + offset
        return epoch * self._parent_length + local

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(index)]

    def _getitems(self, indices: Sequence[int]):
        return self._parent._getitems([self._parent_index(i) for i in indices])

    def __str__(self) -> str:
        return f"BlockShardMapDataset(block={self._block}, index={self._index}, count={self._count})"


def merge_batches(batches: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Collated batches (before or after ``patchify_batch``) -> one batch, rows in order. Prompts are
    left-padded to the longest batch's length: a bucket, the one ``collate`` would have chosen for all the
    rows at once; images (and their pixels) follow their rows."""
    if len(batches) == 1:
        return batches[0]
    length = max(b["input_ids"].shape[1] for b in batches)
    out: dict[str, Any] = {}
    for key in ("input_ids", "attention_mask"):
        fill = pad_id if key == "input_ids" else 0
        out[key] = np.concatenate(
            [np.pad(b[key], ((0, 0), (length - b[key].shape[1], 0)), constant_values=fill) for b in batches]
        )
    for key in batches[0]:
        if key == "images":
            out[key] = [img for b in batches for img in b[key]]
        elif key not in out:
            out[key] = np.concatenate([b[key] for b in batches])
    return out


class _GatherIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, pad_id: int):
        super().__init__(parent)
        self._pad_id = pad_id

    def __next__(self) -> dict[str, Any]:
        from scalereasoner_jax.parallel import allgather_objects

        # Every process takes part in every exchange, also once its own shard has run out (a last
        # partial round), so that none waits for the others forever; the loop ends when all ran out.
        try:
            local = next(self._parent)
        except StopIteration:
            local = None
        batches = [b for b in allgather_objects(local) if b is not None]
        if not batches:
            raise StopIteration
        return merge_batches(batches, self._pad_id)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()  # this process's position; the checkpoint keeps one per process

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)

    def close(self) -> None:
        self._parent.close()


class GatherIterDataset(grain.IterDataset):
    """Each process's batches -> the global batch on every process (collective; see the module doc)."""

    def __init__(self, parent: grain.IterDataset, *, pad_id: int):
        super().__init__(parent)
        self._pad_id = pad_id

    def __iter__(self) -> grain.DatasetIterator:
        return _GatherIterator(self._parent.__iter__(), self._pad_id)

    def __str__(self) -> str:
        return "GatherIterDataset"


def data_source(
    dataset: str | Path, split: str, data_dir: str | Path | None = None
) -> Sequence[Mapping[str, Any]]:
    """Random access to a built TFDS dataset without TensorFlow.

    ``dataset`` is a registered name (e.g. ``scale_vqa``) or the path of a built dataset version
    directory; images come back as encoded bytes and are decoded by the pipeline.
    """
    import tensorflow_datasets as tfds

    from scalereasoner_jax.data.build import raw_image_decoders

    path = Path(dataset)
    decoders = raw_image_decoders()
    if path.is_dir():
        builder = tfds.builder_from_directory(str(path))
        return builder.as_data_source(split=split, decoders=decoders)
    return tfds.data_source(
        str(dataset), split=split, data_dir=str(data_dir) if data_dir else None, decoders=decoders
    )
