"""TFDS builder for ``wsi_cross_scale``: same-centre views at several magnifications from whole slides.

A thin shell: the slide reading and example logic live in ``scalereasoner_jax.data.wsi`` and
``scalereasoner_jax.data.wsi_build`` (no TFDS there). Images arrive as PNG bytes made with PIL, so
building needs no TensorFlow. Files are written as array_record unless another format is asked for.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from scalereasoner_jax.data import wsi, wsi_build


@dataclasses.dataclass(eq=False)
class WsiCrossScaleConfig(tfds.core.BuilderConfig):
    """How views are cut (mirrors ``wsi_build.CrossScaleOptions``; see there and in ``wsi``)."""

    magnifications: tuple[float, ...] = (5, 10, 20)
    mpp_per_magnification_numerator: float = wsi.DEFAULT_MPP_NUMERATOR
    out_size: int = 448
    centres_per_slide: int = 4
    seed: int = 0
    allow_upsample: bool = False
    skip_unreadable: bool = False
    assume_mpp: float | None = None
    mpp_tolerance: float = wsi.DEFAULT_MPP_TOLERANCE
    anchor_to_native: bool = True
    min_tissue_fraction: float = 0.5

    def __post_init__(self) -> None:
        # Validate early (bad values fail at construction, not halfway through a build).
        self.magnifications = wsi_build.CrossScaleOptions.from_config(self).magnifications


class Builder(tfds.core.GeneratorBasedBuilder):
    """Cross-scale view groups cut from whole-slide images listed in a manifest."""

    # README/CITATIONS/TAGS (and checksums) sit next to this file. TFDS infers these paths through
    # importlib.resources, which fails while `tfds_builders` is an editable-install namespace package
    # (no __init__.py), so both are given explicitly.
    pkg_dir_path = epath.Path(__file__).parent
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        WsiCrossScaleConfig(
            name="default",
            description="5x, 10x, 20x views (mpp = 10 / magnification), 448 px, 4 tissue centres a slide.",
        ),
        WsiCrossScaleConfig(
            name="four_scales",
            magnifications=(5, 10, 20, 40),
            description="5x to 40x; 40x views of 20x slides are skipped and counted (no upsampling).",
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Put a manifest and the slides in the manual folder (`--manual_dir`):

      manifest.csv   (header: slide[,x,y][,label][,id])   or   manifest.jsonl (one JSON object a line)

    `slide` is a path relative to the manual folder (it may not leave it; absolute paths are taken as
    given); `x`, `y` are an optional level-0 centre in pixels (both or neither; without them,
    `centres_per_slide` centres are sampled on tissue); `label` and `id` are optional text.
    Slides are read with tiffslide (SVS, generic pyramidal TIFF, ...) and need a resolution (mpp)
    unless the config sets `assume_mpp`.
    """

    def download_and_prepare(self, *, file_format: Any = None, **kwargs: Any) -> None:
        """As TFDS's, but writing array_record unless a format is given."""
        super().download_and_prepare(file_format=file_format or "array_record", **kwargs)

    @property
    def options(self) -> wsi_build.CrossScaleOptions:
        return wsi_build.CrossScaleOptions.from_config(self.builder_config)

    def _info(self) -> tfds.core.DatasetInfo:
        size = int(self.builder_config.out_size)
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "slide": tfds.features.Text(),
                    "centre": tfds.features.Tensor(shape=(2,), dtype=np.int64),
                    "label": tfds.features.Text(),
                    "images": tfds.features.Sequence(
                        tfds.features.Image(shape=(size, size, 3), encoding_format="png")
                    ),
                    "magnifications": tfds.features.Sequence(tfds.features.Text()),
                    "mpp": tfds.features.Sequence(tfds.features.Scalar(dtype=np.float32)),
                }
            ),
            supervised_keys=None,
            homepage="https://github.com/bgilbert/openslide-testdata",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        manifest = wsi.find_manifest(dl_manager.manual_dir)
        self._report = wsi_build.CrossScaleReport(self.options, manifest)
        return {"train": self._generate_examples(manifest)}

    def _generate_examples(self, manifest: Any) -> Any:
        yield from wsi_build.iter_cross_scale_examples(manifest, self.options, self._report)

    def _download_and_prepare(self, dl_manager: Any, download_config: Any) -> None:
        super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
        # data_path is still the incomplete folder here; it is renamed to the version folder on success.
        self.build_report = self._report.to_dict()
        (self.data_path / wsi_build.REPORT_FILENAME).write_text(json.dumps(self.build_report, indent=2))
