"""The Scale-VQA record (DESIGN.md §3) and its validation.

One JSON list per split (``train.json``, ``val.json``, ``test.json``); every item names its views by paths
relative to an image root. Validation runs before anything is packaged so that a broken release fails
loudly, naming every bad record as ``split=test index=12 No=345: <reason>``. With ``skip_invalid`` the bad
records are left out instead, and the caller writes the report (:meth:`ValidationReport.to_json`) next to
the data: nothing is ever dropped silently.

Image paths are checked lexically before any file is touched (absolute paths and ``..`` are refused and
never opened); images are checked by their header only (PIL ``Image.open`` without ``load``), so a
decompression bomb is caught without being decoded. This module needs neither TensorFlow nor TFDS, so
the curation tools can reuse it.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import re
import string
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import PIL.Image

QUESTION_TYPES: tuple[str, ...] = ("type_A", "type_B", "type_C", "type_D", "type_E")
QUESTION_TYPE_NAMES: dict[str, str] = {
    "type_A": "Correspondence",
    "type_B": "Confirmation",
    "type_C": "Localization",
    "type_D": "Explanation",
    "type_E": "Diagnosis",
}
# Views in prompt order; the release names them `<mag>_mag` under `image_path`.
MAGNIFICATIONS: tuple[str, ...] = ("low", "mid", "high")
OPTIONAL_MAGNIFICATIONS: frozenset[str] = frozenset({"high"})  # `high_mag: null` gives a two-view item
SPLITS: tuple[str, ...] = ("train", "val", "test")  # named after the release's files
# 8192 x 8192: room for large views, far below a decompression bomb (PIL warns from ~89 Mpx).
DEFAULT_MAX_IMAGE_PIXELS = 2**26
DEFAULT_IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG")

_REQUIRED_EXTRA = ("wsi_name", "path_id", "question_type")


class Reason(enum.StrEnum):
    """Why a record is invalid; the key of the per-reason counts in the skip report."""

    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    BAD_TYPE = "bad_type"
    OPTION_KEYS = "option_keys"
    ANSWER_NOT_IN_OPTIONS = "answer_not_in_options"
    BAD_QUESTION_TYPE = "bad_question_type"
    DUPLICATE_NO = "duplicate_no"
    DUPLICATE_PATH_ID_QUESTION_TYPE = "duplicate_path_id_question_type"
    UNSAFE_IMAGE_PATH = "unsafe_image_path"
    MISSING_IMAGE = "missing_image"
    UNREADABLE_IMAGE = "unreadable_image"
    UNSUPPORTED_IMAGE_FORMAT = "unsupported_image_format"
    IMAGE_TOO_LARGE = "image_too_large"


@dataclasses.dataclass(frozen=True)
class ValidationPolicy:
    """What counts as valid and what happens to invalid records (default: fail on any)."""

    skip_invalid: bool = False
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    image_formats: tuple[str, ...] = DEFAULT_IMAGE_FORMATS  # PIL format names
    check_images: bool = True  # False: text-only checks (paths are still checked lexically)

    def __post_init__(self) -> None:
        if self.max_image_pixels <= 0:
            raise ValueError(f"max_image_pixels must be positive, got {self.max_image_pixels}")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One reason one record is invalid."""

    split: str
    index: int
    no: Any  # the record's `No` as found (None when absent)
    reason: Reason
    detail: str

    def __str__(self) -> str:
        no = "?" if self.no is None else self.no
        return f"split={self.split} index={self.index} No={no}: {self.detail}"

    def to_json(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "index": self.index,
            "No": self.no,
            "reason": str(self.reason),
            "detail": self.detail,
        }


@dataclasses.dataclass
class ValidationReport:
    """Every problem found, and how many records each split had and kept."""

    policy: ValidationPolicy = dataclasses.field(default_factory=ValidationPolicy)
    num_records: dict[str, int] = dataclasses.field(default_factory=dict)
    num_kept: dict[str, int] = dataclasses.field(default_factory=dict)
    problems: list[Problem] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        """Problems per reason (a record with two problems counts under both)."""
        return dict(sorted(collections.Counter(str(p.reason) for p in self.problems).items()))

    def bad_records(self) -> list[tuple[str, int, Any]]:
        """(split, index, No) of every invalid record, in order of first problem."""
        seen: dict[tuple[str, int], Any] = {}
        for p in self.problems:
            seen.setdefault((p.split, p.index), p.no)
        return [(split, index, no) for (split, index), no in seen.items()]

    def merge(self, other: ValidationReport) -> ValidationReport:
        return ValidationReport(
            policy=self.policy,
            num_records={**self.num_records, **other.num_records},
            num_kept={**self.num_kept, **other.num_kept},
            problems=[*self.problems, *other.problems],
        )

    def format(self) -> str:
        """All problems, one line each."""
        return "\n".join(str(p) for p in self.problems)

    def to_json(self) -> dict[str, Any]:
        """The skip report: counts per reason, then every problem with its record's ids."""
        return {
            "policy": {
                "skip_invalid": self.policy.skip_invalid,
                "max_image_pixels": self.policy.max_image_pixels,
                "image_formats": list(self.policy.image_formats),
            },
            "num_records": dict(self.num_records),
            "num_kept": dict(self.num_kept),
            "num_skipped": {s: self.num_records[s] - self.num_kept.get(s, 0) for s in self.num_records},
            "counts": self.counts(),
            "skipped": [p.to_json() for p in self.problems],
        }

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path


class ValidationError(ValueError):
    """Raised under the default policy; the message lists every problem of every bad record."""

    def __init__(self, report: ValidationReport):
        self.report = report
        n = len(report.bad_records())
        head = (
            f"{n} invalid Scale-VQA record(s), {len(report.problems)} problem(s) "
            f"(rebuild with skip_invalid to leave them out and write a report):"
        )
        super().__init__(head + "\n" + report.format())


@dataclasses.dataclass(frozen=True)
class ScaleVQARecord:
    """One validated Scale-VQA item."""

    no: int
    question: str
    options: dict[str, str]  # letter -> text, letters A, B, ... in order
    answer: str  # one of the option letters
    rationale: str
    question_type: str  # type_A .. type_E
    wsi_name: str
    path_id: str
    image_paths: dict[str, str]  # magnification -> path relative to the image root; only present views
    split: str = ""
    index: int = -1  # position in the split's JSON list

    @property
    def id(self) -> str:
        return str(self.no)

    @property
    def magnifications(self) -> list[str]:
        return list(self.image_paths)

    def image_files(self, image_root: str | Path) -> list[Path]:
        """The views' files, in order low, mid, high (paths were validated as inside the root)."""
        return [resolve_image_path(image_root, p) for p in self.image_paths.values()]

    def to_release_json(self) -> dict[str, Any]:
        """The record in the release's own layout (for tools that rewrite a split)."""
        return {
            "No": self.no,
            "question": self.question,
            "options": dict(self.options),
            "answer": self.answer,
            "rationale": self.rationale,
            "image_path": {f"{m}_mag": self.image_paths.get(m) for m in MAGNIFICATIONS},
            "extra_info": {
                "wsi_name": self.wsi_name,
                "path_id": self.path_id,
                "question_type": self.question_type,
            },
        }


class UnsafeImagePath(ValueError):
    """An image path that is absolute or leaves the image root; it is never opened."""


def check_relative_path(rel: str) -> str | None:
    """Why ``rel`` may not be joined to the image root (None when it may). Purely lexical: opens nothing."""
    if "\x00" in rel:
        return "contains a NUL character"
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        return "is absolute"
    if rel.startswith(("\\", "/", "~")):
        return "is absolute"
    if ".." in re.split(r"[\\/]+", rel):
        return "escapes the image root"
    return None


def resolve_image_path(image_root: str | Path, rel: str) -> Path:
    """``image_root / rel`` after the lexical check; raises :class:`UnsafeImagePath` (naming the path)."""
    why = check_relative_path(rel)
    if why is not None:
        raise UnsafeImagePath(f"image path {rel!r} {why} (refused, not opened)")
    return Path(image_root) / rel


_BOMB_RE = re.compile(r"Image size \((\d+) pixels\)")


def check_image_file(path: Path, label: str, policy: ValidationPolicy) -> tuple[Reason, str] | None:
    """Header-only image check (never decodes the pixels); None when the file is acceptable.

    ``label`` names the image in messages, e.g. ``mid_mag='slides/a_40x.png'``.
    """
    if not path.is_file():
        return Reason.MISSING_IMAGE, f"image file not found: {label}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as im:
                width, height = im.size
                fmt = im.format
    except PIL.Image.DecompressionBombError as e:
        # PIL's own limit (2 x PIL.Image.MAX_IMAGE_PIXELS) fired before ours could; it names the size.
        m = _BOMB_RE.search(str(e))
        pixels = int(m.group(1)) if m else None
        if pixels is None or pixels > policy.max_image_pixels:
            return Reason.IMAGE_TOO_LARGE, (
                f"image {label} has {pixels if pixels is not None else 'too many'} pixels, above the "
                f"bound of {policy.max_image_pixels} (max_image_pixels)"
            )
        fmt, width, height = None, 0, 0  # under our bound; format unknown without PIL's help
    except (OSError, SyntaxError, ValueError) as e:
        return Reason.UNREADABLE_IMAGE, f"image {label} is not a readable image ({type(e).__name__}: {e})"
    if width * height > policy.max_image_pixels:
        return Reason.IMAGE_TOO_LARGE, (
            f"image {label} is {width}x{height} = {width * height} pixels, above the bound of "
            f"{policy.max_image_pixels} (max_image_pixels)"
        )
    if fmt is not None and fmt not in policy.image_formats:
        return Reason.UNSUPPORTED_IMAGE_FORMAT, (
            f"image {label} is {fmt}; accepted formats: {', '.join(policy.image_formats)}"
        )
    return None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_options(options: Mapping[str, Any]) -> list[tuple[Reason, str]]:
    out: list[tuple[Reason, str]] = []
    keys = list(options)
    expected = list(string.ascii_uppercase[: len(keys)])
    if len(keys) < 2 or keys != expected:
        out.append(
            (Reason.OPTION_KEYS, f"option keys {keys} are not consecutive letters from A (at least A, B)")
        )
    for k, v in options.items():
        if not isinstance(v, str):
            out.append((Reason.BAD_TYPE, f"option {k!r} must be a string, got {type(v).__name__}"))
    return out


def _parse_one(
    item: Any, split: str, index: int, image_root: Path, policy: ValidationPolicy, image_cache: dict
) -> tuple[ScaleVQARecord | None, list[Problem]]:
    """The record and its own problems (duplicates are found across records, elsewhere)."""
    if not isinstance(item, Mapping):
        return None, [Problem(split, index, None, Reason.NOT_AN_OBJECT, "record is not a JSON object")]
    no = item.get("No")
    found: list[tuple[Reason, str]] = []

    def missing(name: str) -> None:
        found.append((Reason.MISSING_FIELD, f"missing field {name!r}"))

    def typed(name: str, value: Any, kind: type, what: str) -> bool:
        if value is None:
            missing(name)
            return False
        if not isinstance(value, kind) or (kind is int and not _is_int(value)):
            found.append((Reason.BAD_TYPE, f"field {name!r} must be {what}, got {type(value).__name__}"))
            return False
        return True

    ok_no = typed("No", no, int, "an integer")
    ok_q = typed("question", item.get("question"), str, "a string")
    ok_r = typed("rationale", item.get("rationale"), str, "a string")
    options = item.get("options")
    ok_opts = typed("options", options, Mapping, "an object")
    ok_ans = typed("answer", item.get("answer"), str, "a string")
    if ok_opts:
        found += _check_options(options)
    if ok_opts and ok_ans and item["answer"] not in options:
        found.append(
            (
                Reason.ANSWER_NOT_IN_OPTIONS,
                f"answer {item['answer']!r} is not among the options {list(options)}",
            )
        )

    extra = item.get("extra_info")
    ok_extra = typed("extra_info", extra, Mapping, "an object")
    fields: dict[str, str] = {}
    if ok_extra:
        for k in _REQUIRED_EXTRA:
            if typed(f"extra_info.{k}", extra.get(k), str, "a string"):
                fields[k] = extra[k]
        qt = fields.get("question_type")
        if qt is not None and qt not in QUESTION_TYPES:
            found.append(
                (Reason.BAD_QUESTION_TYPE, f"question_type {qt!r} is not one of {', '.join(QUESTION_TYPES)}")
            )
            fields.pop("question_type")

    image_path = item.get("image_path")
    views: dict[str, str] = {}
    if typed("image_path", image_path, Mapping, "an object"):
        for mag in MAGNIFICATIONS:
            key = f"{mag}_mag"
            rel = image_path.get(key)
            if rel is None and mag in OPTIONAL_MAGNIFICATIONS:
                continue  # a two-view item: kept
            if not typed(f"image_path.{key}", rel, str, "a string"):
                continue
            if not rel:
                missing(f"image_path.{key}")
                continue
            label = f"{key}={rel!r}"
            why = check_relative_path(rel)
            if why is not None:
                found.append((Reason.UNSAFE_IMAGE_PATH, f"image path {label} {why} (refused, not opened)"))
                continue
            if policy.check_images:
                if (key, rel) not in image_cache:
                    image_cache[key, rel] = check_image_file(image_root / rel, label, policy)
                if image_cache[key, rel] is not None:
                    found.append(image_cache[key, rel])
                    continue
            views[mag] = rel

    problems = [Problem(split, index, no, reason, detail) for reason, detail in found]
    if problems or not (ok_no and ok_q and ok_r and ok_opts and ok_ans and ok_extra):
        return None, problems
    record = ScaleVQARecord(
        no=no,
        question=item["question"],
        options=dict(options),
        answer=item["answer"],
        rationale=item["rationale"],
        question_type=fields["question_type"],
        wsi_name=fields["wsi_name"],
        path_id=fields["path_id"],
        image_paths=views,
        split=split,
        index=index,
    )
    return record, []


def _duplicates(items: Sequence[Any], split: str) -> list[Problem]:
    """Later occurrences of a `No` or of a (path_id, question_type) pair; the first one is kept."""
    out: list[Problem] = []
    first_no: dict[Any, int] = {}
    first_pair: dict[tuple[str, str], tuple[int, Any]] = {}
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            continue
        no = item.get("No")
        if _is_int(no):
            if no in first_no:
                out.append(
                    Problem(
                        split,
                        index,
                        no,
                        Reason.DUPLICATE_NO,
                        f"duplicate No {no} (first at index {first_no[no]})",
                    )
                )
            else:
                first_no[no] = index
        extra = item.get("extra_info")
        if isinstance(extra, Mapping):
            pair = (extra.get("path_id"), extra.get("question_type"))
            if all(isinstance(x, str) for x in pair):
                if pair in first_pair:
                    i0, no0 = first_pair[pair]
                    out.append(
                        Problem(
                            split,
                            index,
                            no,
                            Reason.DUPLICATE_PATH_ID_QUESTION_TYPE,
                            f"duplicate (path_id, question_type) = ({pair[0]!r}, {pair[1]!r}) "
                            f"(first at index {i0}, No={no0})",
                        )
                    )
                else:
                    first_pair[pair] = (index, no)
    return out


def validate_split(
    items: Sequence[Any], image_root: str | Path, split: str, policy: ValidationPolicy | None = None
) -> tuple[list[ScaleVQARecord], ValidationReport]:
    """The valid records (in source order) and a report of all problems. Never raises on bad records."""
    policy = policy or ValidationPolicy()
    image_root = Path(image_root)
    # A triplet's views serve five questions: check each file once.
    image_cache: dict[tuple[str, str], tuple[Reason, str] | None] = {}
    parsed: list[ScaleVQARecord | None] = []
    per_index: dict[int, list[Problem]] = collections.defaultdict(list)
    for index, item in enumerate(items):
        record, problems = _parse_one(item, split, index, image_root, policy, image_cache)
        parsed.append(record)
        per_index[index] += problems
    for p in _duplicates(items, split):
        per_index[p.index].append(p)
    problems = [p for i in sorted(per_index) for p in per_index[i]]
    records = [r for i, r in enumerate(parsed) if r is not None and not per_index[i]]
    report = ValidationReport(
        policy=policy, num_records={split: len(items)}, num_kept={split: len(records)}, problems=problems
    )
    return records, report


def read_release_json(json_path: str | Path) -> list[Any]:
    """A split's JSON list; a file that is not a JSON list is an error no policy can skip."""
    json_path = Path(json_path)
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise ValueError(f"{json_path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def load_split(
    json_path: str | Path, image_root: str | Path, split: str, policy: ValidationPolicy | None = None
) -> tuple[list[ScaleVQARecord], ValidationReport]:
    """Read and validate one split. Default policy: raise :class:`ValidationError` listing every problem;
    with ``policy.skip_invalid`` return only the valid records and the report of the others."""
    policy = policy or ValidationPolicy()
    records, report = validate_split(read_release_json(json_path), image_root, split, policy)
    if report.problems and not policy.skip_invalid:
        raise ValidationError(report)
    return records, report


def find_split_files(manual_dir: str | Path, splits: Iterable[str] = SPLITS) -> dict[str, Path]:
    """The release files present in ``manual_dir`` (``<split>.json``), in split order."""
    manual_dir = Path(manual_dir)
    return {s: manual_dir / f"{s}.json" for s in splits if (manual_dir / f"{s}.json").is_file()}
