"""Scale-VQA (the official ScaleReasoner release) as a TFDS dataset.

Manual download: ``--manual_dir DIR`` holds any of ``train.json``, ``val.json``, ``test.json`` and the
image files at the (relative) paths they name. Every record is validated first
(:mod:`scalereasoner_jax.data.schema`); by default any invalid record fails the build with a list of all
of them. The ``skip_invalid`` config leaves them out and writes ``skip_report.json`` into the dataset's
version directory (its counts also go to ``metadata.json``).

Images are handed to TFDS as the source files' bytes, so they are stored unchanged (JPEG stays JPEG,
PNG stays PNG) and neither building nor reading needs TensorFlow. Records keep their source order.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from scalereasoner_jax.data import schema

SKIP_REPORT_FILENAME = "skip_report.json"
DEFAULT_FILE_FORMAT = "array_record"  # random access without TensorFlow (tfds.data_source, Grain)


@dataclasses.dataclass(eq=False)
class ScaleVQAConfig(tfds.core.BuilderConfig):
    """Validation policy of a build. Only ``default`` is registered (strict); other policies are custom
    configs with their own name, so a filtered build never hides under the name of the full one."""

    skip_invalid: bool = False
    max_image_pixels: int = schema.DEFAULT_MAX_IMAGE_PIXELS

    def policy(self) -> schema.ValidationPolicy:
        return schema.ValidationPolicy(skip_invalid=self.skip_invalid, max_image_pixels=self.max_image_pixels)


def config_for(
    skip_invalid: bool = False, max_image_pixels: int = schema.DEFAULT_MAX_IMAGE_PIXELS
) -> str | ScaleVQAConfig:
    """The config for a policy: ``"default"`` for the defaults, else a custom config named after it."""
    if not skip_invalid and max_image_pixels == schema.DEFAULT_MAX_IMAGE_PIXELS:
        return "default"
    name = "skip_invalid" if skip_invalid else "strict"
    if max_image_pixels != schema.DEFAULT_MAX_IMAGE_PIXELS:
        name += f"_max_pixels_{max_image_pixels}"
    return ScaleVQAConfig(
        name=name,
        description=f"skip_invalid={skip_invalid}, max_image_pixels={max_image_pixels}",
        skip_invalid=skip_invalid,
        max_image_pixels=max_image_pixels,
    )


def features() -> tfds.features.FeaturesDict:
    """The feature spec: these names are the contract the pipeline and users rely on."""
    text = tfds.features.Text
    return tfds.features.FeaturesDict(
        {
            "id": text(doc="str of the record's `No`"),
            "question": text(),
            "options": tfds.features.Sequence(
                {"letter": text(), "text": text()}, doc="options in key order A, B, ..."
            ),
            "answer": text(doc="the correct option letter"),
            "rationale": text(),
            "question_type": tfds.features.ClassLabel(
                names=list(schema.QUESTION_TYPES),
                doc="type_A..type_E = " + ", ".join(schema.QUESTION_TYPE_NAMES.values()),
            ),
            "wsi_name": text(),
            "path_id": text(doc="UUID of the view triplet"),
            "images": tfds.features.Sequence(
                tfds.features.Image(),
                doc="the views present, in order low, mid, high; the source files' bytes, not re-encoded",
            ),
            "magnifications": tfds.features.Sequence(text(), doc="'low' / 'mid' / 'high', one per image"),
        }
    )


class Builder(tfds.core.GeneratorBasedBuilder):
    """DatasetBuilder for the Scale-VQA release (manual download)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Initial release: the official train/val/test JSON files and their views."
    }
    BUILDER_CONFIGS: ClassVar[list[ScaleVQAConfig]] = [
        ScaleVQAConfig(name="default", description="strict: any invalid record fails the build")
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "default"
    # README/CITATIONS/TAGS (and checksums.tsv, if any) live next to this file. Set explicitly: TFDS infers
    # them through importlib.resources, which fails on a namespace package such as an editable
    # `tfds_builders` ("MultiplexedPath only supports directories").
    code_path = epath.Path(__file__).resolve()
    pkg_dir_path = code_path.parent
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Put any of `train.json`, `val.json`, `test.json` of the Scale-VQA release into the manual dir, with the
    image files at the paths (relative to the manual dir) that their `image_path` entries name.
    Build: `scalereasoner data build scale_vqa --manual_dir DIR --data_dir OUT` (no TensorFlow needed), or
    `tfds build tfds_builders/scale_vqa --manual_dir DIR --data_dir OUT`. To leave invalid records out
    (with a report) instead of failing: `--config '{"name": "skip_invalid", "skip_invalid": true}'`.
    """

    def __init__(self, *, file_format: str | None = None, **kwargs: Any):
        super().__init__(file_format=file_format, **kwargs)
        # TFDS defaults to tfrecord, which needs TensorFlow; keep whatever an existing build was written in.
        # (`is_prepared()` would log a warning for every fresh build.)
        if file_format is None and not (self.data_path / "dataset_info.json").exists():
            self.info.set_file_format(DEFAULT_FILE_FORMAT, override=True)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=features(),
            homepage="https://arxiv.org/abs/2606.17412",
            disable_shuffling=True,  # keys are source positions: examples keep the release's order
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        manual_dir = Path(dl_manager.manual_dir)
        files = schema.find_split_files(manual_dir)
        if not files:
            raise FileNotFoundError(
                f"none of {', '.join(s + '.json' for s in schema.SPLITS)} found in the manual dir "
                f"{manual_dir}"
            )
        policy = self.builder_config.policy()
        report = schema.ValidationReport(policy=policy)
        records: dict[str, list[schema.ScaleVQARecord]] = {}
        for split, path in files.items():  # validate every split before failing, to list everything
            records[split], split_report = schema.validate_split(
                schema.read_release_json(path), manual_dir, split, policy
            )
            report = report.merge(split_report)
        if report.problems and not policy.skip_invalid:
            raise schema.ValidationError(report)
        # TFDS cannot write an empty split: one with no (valid) records is left out, and said so.
        empty = [split for split, recs in records.items() if not recs]
        if len(empty) == len(records):
            raise ValueError(f"no valid records to write in {', '.join(str(files[s]) for s in empty)}")
        for split in empty:
            logging.warning("Scale-VQA split %r has no valid records; it is left out of the dataset", split)
        summary = {**report.to_json(), "empty_splits_left_out": empty}
        self.info.metadata["validation"] = {k: v for k, v in summary.items() if k != "skipped"}
        if policy.skip_invalid:
            # self.data_dir is the temporary build dir here; it becomes the version dir on success.
            report_path = Path(self.data_dir) / SKIP_REPORT_FILENAME
            report_path.parent.mkdir(parents=True, exist_ok=True)
            report_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return {split: self._generate_examples(recs, manual_dir) for split, recs in records.items() if recs}

    def _generate_examples(
        self, records: list[schema.ScaleVQARecord], image_root: Path
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        for r in records:
            yield (
                r.index,
                {
                    "id": r.id,
                    "question": r.question,
                    "options": [{"letter": k, "text": v} for k, v in r.options.items()],
                    "answer": r.answer,
                    "rationale": r.rationale,
                    "question_type": r.question_type,
                    "wsi_name": r.wsi_name,
                    "path_id": r.path_id,
                    # Raw bytes: TFDS stores them as given (arrays would be re-encoded, with TensorFlow).
                    "images": [p.read_bytes() for p in r.image_files(image_root)],
                    "magnifications": r.magnifications,
                },
            )
