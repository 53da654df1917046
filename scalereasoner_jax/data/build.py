"""Package the Scale-VQA release with its TFDS builder, without TensorFlow.

This is what ``scalereasoner data build scale_vqa --manual_dir DIR --data_dir OUT`` runs: it drives the
builder's own ``download_and_prepare`` (so the result is identical to ``tfds build tfds_builders/scale_vqa``)
and writes ``array_record``, which TFDS writes and reads with no TensorFlow installed.

Reading back, also without TensorFlow::

    tfds.data_source("scale_vqa", data_dir=OUT, split="test")                    # images decoded (numpy)
    tfds.data_source("scale_vqa", data_dir=OUT, split="test", decoders=raw_image_decoders())  # bytes
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from scalereasoner_jax.data.schema import DEFAULT_MAX_IMAGE_PIXELS


class SkipImageSequenceDecoding(tfds.decode.SkipDecoding):
    """``tfds.decode.SkipDecoding`` for a ``Sequence(Image())`` on the NumPy path (``tfds.data_source``).

    TFDS 4.9.10's ``SkipDecoding`` lacks ``decode_batch_example_np``, so on a sequence feature it raises
    ``AttributeError``; this gives the stored bytes as a list instead.
    """

    def decode_batch_example_np(self, example: Any) -> list[bytes]:
        return [bytes(x) for x in np.asarray(example, dtype=object).reshape(-1)]


def raw_image_decoders() -> dict[str, tfds.decode.Decoder]:
    """Decoders that leave the ``images`` of a Scale-VQA example as their encoded (source) bytes."""
    return {"images": SkipImageSequenceDecoding()}


def build_scale_vqa(
    manual_dir: str | Path,
    data_dir: str | Path,
    *,
    skip_invalid: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    file_format: str = "array_record",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Validate and package the release in ``manual_dir`` into ``data_dir``.

    Default policy: any invalid record raises :class:`scalereasoner_jax.data.schema.ValidationError`
    listing all of them, and nothing is written. ``skip_invalid=True`` builds the custom config
    ``skip_invalid`` instead (its own directory, never mistaken for the full release) and writes
    ``skip_report.json`` into the version directory. An existing build of the same config is reused
    unless ``overwrite``.

    Returns ``name`` (for ``tfds.data_source``/``tfds.builder``), ``builder_dir`` (the version
    directory, for ``tfds.builder_from_directory``), ``config``, ``splits`` (examples per split),
    ``skip_report`` (path or None), ``file_format`` and ``reused``.
    """
    from tfds_builders.scale_vqa import scale_vqa_dataset_builder as scale_vqa

    manual_dir = Path(manual_dir).resolve()
    if not manual_dir.is_dir():
        raise FileNotFoundError(f"manual dir not found: {manual_dir}")
    config = scale_vqa.config_for(skip_invalid=skip_invalid, max_image_pixels=max_image_pixels)
    builder = scale_vqa.Builder(
        data_dir=str(Path(data_dir).resolve()), config=config, file_format=file_format
    )
    reused = (builder.data_path / "dataset_info.json").exists() and not overwrite
    download_config = tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    if overwrite:  # regenerate (the default mode returns an existing build untouched)
        download_config.download_mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
    builder.download_and_prepare(download_config=download_config)
    report = Path(builder.data_dir) / scale_vqa.SKIP_REPORT_FILENAME
    config_name = builder.builder_config.name
    return {
        "name": f"{builder.name}/{config_name}:{builder.version}",
        "builder_dir": str(builder.data_dir),
        "config": config_name,
        "splits": {name: int(split.num_examples) for name, split in builder.info.splits.items()},
        "skip_report": str(report) if report.is_file() else None,
        "file_format": builder.info.file_format.value,
        "reused": reused,
    }
