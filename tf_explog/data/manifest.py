"""Data-set manifests in the Medical Segmentation Decathlon ``dataset.json`` layout.

Example (paths are relative to the folder of ``dataset.json``)::

    {
      "name": "Brain", "modality": {"0": "T1"},
      "labels": {"0": "background", "1": "white matter", ...},
      "training": [{"image": "./imagesTr/s01.nii.gz", "label": "./labelsTr/s01.nii.gz"}, ...],
      "test": ["./imagesTs/s40.nii.gz", ...]
    }

MSD's ``test`` lists plain strings; lists of ``{"image", "label"}`` dicts are accepted too. Two
optional keys are tf_explog extensions: ``validation`` (an explicit list like ``training``) and
``label_map`` (``{"1": [2, 41], ...}``, see :class:`tf_explog.data.nifti.LabelMap`).

This module does not import TensorFlow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from .nifti import (LabelMap, NiftiError, apply_label_map, load_volume, nifti_stem,
                    read_header)
from .preprocess import Preprocessor, affines_close
from tf_explog.errors import InputError

__all__ = ["ManifestError", "Entry", "Manifest", "label_frequencies", "SPLITS",
           "read_dataset_json", "parse_labels"]

PathLike = Union[str, os.PathLike]
SPLITS = ("training", "validation", "test", "all")


class ManifestError(InputError):
    """One or more problems with a data set; ``problems`` lists each, naming its file.

    Attributes:
        problems: list of messages, each starting with the offending file (or field).
        path: the ``dataset.json`` concerned.
    """

    def __init__(self, problems: Union[str, Sequence[str]], path: PathLike = "") -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.path = os.fspath(path)
        head = f"{self.path}: " if self.path else ""
        n = len(self.problems)
        body = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{head}{n} problem{'s' if n != 1 else ''} in the data set:\n{body}")


def read_dataset_json(path: PathLike) -> dict:
    """The top-level object of a ``dataset.json``; a `ManifestError` naming the file when it
    is unreadable, not JSON or not an object."""
    path = Path(path)
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})", path) from exc
    except RecursionError:
        raise ManifestError(f"{path}: not valid JSON (nested too deeply)", path) from None
    if not isinstance(raw, Mapping):
        raise ManifestError(f"{path}: expected a JSON object at top level", path)
    return raw


def parse_labels(raw_labels: Any, problems: list) -> dict:
    """Label id → name from a ``dataset.json``'s ``labels``, in either layout: the Medical
    Segmentation Decathlon's ``{"0": "background", "1": ...}`` or nnU-Net v2's
    ``{"background": 0, ...}`` (recognised when every value is an int). Each problem is
    appended to ``problems`` (naming the key); what could be read is returned."""
    if not isinstance(raw_labels, Mapping) or not raw_labels:
        problems.append("labels: missing or empty; expected {\"0\": \"background\", ...}")
        return {}
    if all(isinstance(v, int) and not isinstance(v, bool) for v in raw_labels.values()):
        raw_labels = {v: k for k, v in raw_labels.items()}  # nnU-Net v2: name -> id
    labels = {}
    for k, v in raw_labels.items():
        try:
            key = int(k)
        except (TypeError, ValueError):
            problems.append(f"labels: key {k!r} is not an integer id")
            continue
        if key < 0 or str(key) != str(k).strip():
            problems.append(f"labels: key {k!r} is not a non-negative integer id")
        elif not isinstance(v, str) or not v:
            problems.append(f"labels: name of label {key} must be a non-empty string, got {v!r}")
        else:
            labels[key] = v
    return labels


@dataclass(frozen=True)
class Entry:
    """One case: an image file and its label file (None for unlabelled test cases)."""

    image: Path
    label: Optional[Path]
    id: str

    @property
    def pair(self) -> tuple:
        """``(image, label)`` as strings (label may be None)."""
        return str(self.image), (str(self.label) if self.label is not None else None)


def _case_id(path: Path) -> str:
    return nifti_stem(path.name) or path.stem


def _resolve(root: Path, value) -> Path:
    p = Path(os.path.expanduser(str(value)))
    return p if p.is_absolute() else (root / p)


def _real(path: Path) -> Path:
    """``path.resolve()``, or the absolute path when it is a symbolic link loop (which
    ``resolve`` refuses with RuntimeError): such a file is then reported as unreadable."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return Path(os.path.abspath(path))


def _parse_entries(raw, section: str, root: Path, problems: list, need_label: bool) -> list:
    if raw is None:
        return []
    if not isinstance(raw, list):
        problems.append(f"{section}: expected a list, got {type(raw).__name__}")
        return []
    out = []
    for i, item in enumerate(raw):
        where = f"{section}[{i}]"
        if isinstance(item, str):
            if need_label:
                problems.append(
                    f"{where}: {item!r} has no label; expected {{'image': ..., 'label': ...}}"
                )
                continue
            image, label = item, None
        elif isinstance(item, Mapping):
            image, label = item.get("image"), item.get("label")
            if not isinstance(image, str) or not image:
                problems.append(f"{where}: missing or invalid 'image' (got {image!r})")
                continue
            if label is not None and (not isinstance(label, str) or not label):
                problems.append(f"{where}: invalid 'label' {label!r}, expected a path")
                continue
            if need_label and label is None:
                problems.append(f"{where}: {image}: missing 'label'")
                continue
        else:
            problems.append(f"{where}: expected a path or {{'image', 'label'}}, got {item!r}")
            continue
        img = _resolve(root, image)
        lab = _resolve(root, label) if label is not None else None
        out.append(Entry(img, lab, _case_id(img)))
    return out


@dataclass
class Manifest:
    """A data set: label names, modalities, training/validation/test cases.

    Build with :meth:`load`. ``entries("training")`` excludes the validation cases, which are an
    explicit ``validation`` list when the json has one, else a seeded fraction of ``training``.
    """

    path: Path
    name: str
    labels: dict
    modality: dict
    training: list
    test: list
    validation: Optional[list] = None
    validation_fraction: float = 0.2
    seed: int = 0
    label_map: Optional[dict] = None
    unknown_labels: str = "raise"
    raw: dict = field(default_factory=dict, repr=False)
    label_map_source: str = "label_map"

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        path: PathLike,
        *,
        validation_fraction: float = 0.2,
        seed: int = 0,
        label_map: Optional[Mapping] = None,
        unknown_labels: str = "raise",
    ) -> "Manifest":
        """Read a ``dataset.json`` (or a folder holding one).

        Args:
            path: the json file or its folder.
            validation_fraction: share of ``training`` held out for validation when the json
                has no explicit ``validation`` list (0 disables; at least one case otherwise).
            seed: seed of that split (the split is deterministic for a seed).
            label_map: ``{class: [original ids]}`` or a :class:`~tf_explog.labels.LabelMap`
                (e.g. from :func:`~tf_explog.labels.load_label_map`), overriding the json's
                ``label_map``.
            unknown_labels: with a label map, label values outside it are a problem ("raise")
                or background ("background").

        Raises:
            ManifestError: unreadable json or structural problems (all listed at once).
        """
        path = Path(path)
        if path.is_dir():
            path = path / "dataset.json"
        if not path.exists():
            raise ManifestError(f"{path}: file not found", path)
        raw = read_dataset_json(path)
        if not 0.0 <= float(validation_fraction) < 1.0:
            raise InputError(
                f"validation_fraction: expected 0 <= f < 1, got {validation_fraction!r}"
            )
        if unknown_labels not in ("raise", "background"):
            raise InputError(
                f"unknown_labels: expected 'raise' or 'background', got {unknown_labels!r}"
            )
        root = path.parent.resolve()
        problems: list = []

        labels = parse_labels(raw.get("labels"), problems)
        if labels and sorted(labels) != list(range(len(labels))):
            problems.append(
                f"labels: ids must be 0..{len(labels) - 1} without gaps, got {sorted(labels)}"
            )
        modality = {}
        raw_mod = raw.get("modality", {})
        if isinstance(raw_mod, Mapping):
            for k, v in raw_mod.items():
                try:
                    modality[int(k)] = str(v)
                except (TypeError, ValueError):
                    problems.append(f"modality: key {k!r} is not an integer channel index")
        else:
            problems.append("modality: expected an object {\"0\": \"T1\", ...}")

        if "training" not in raw:
            problems.append("training: missing")
        training = _parse_entries(raw.get("training"), "training", root, problems, need_label=True)
        test = _parse_entries(raw.get("test"), "test", root, problems, need_label=False)
        validation = None
        if "validation" in raw:
            validation = _parse_entries(
                raw["validation"], "validation", root, problems, need_label=True
            )

        lm = label_map if label_map is not None else raw.get("label_map")
        if lm is not None:
            try:
                lm_obj = LabelMap.coerce(lm, source=f"{path}: label_map")
                lm = lm_obj.to_dict()
                extra = sorted(set(lm_obj.mapping) - set(labels))
                if labels and extra:
                    problems.append(f"{lm_obj.source}: class(es) {extra} are not in the data "
                                    f"set's labels {sorted(labels)}")
                # A class no original id maps to is an output trained never to fire.
                unmapped = sorted(set(labels) - set(lm_obj.mapping) - {0})
                if labels and not extra and unmapped:
                    problems.append(f"{lm_obj.source}: class(es) {unmapped} of the data set's "
                                    f"labels list no original ids; map at least one id to "
                                    "each class, or drop it from 'labels'")
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ManifestError(problems, path)
        return cls(
            path=path,
            name=str(raw.get("name", root.name)),
            labels=dict(sorted(labels.items())),
            modality=dict(sorted(modality.items())),
            training=training,
            test=test,
            validation=validation,
            validation_fraction=float(validation_fraction),
            seed=int(seed),
            label_map=lm,
            unknown_labels=unknown_labels,
            raw=dict(raw),
            label_map_source=lm_obj.source if lm is not None else "label_map",
        )

    # ------------------------------------------------------------------ properties

    @property
    def root(self) -> Path:
        """Folder of ``dataset.json`` (relative paths are resolved against it)."""
        return self.path.parent.resolve()

    @property
    def label_names(self) -> list:
        """Label names in id order (index 0 = background)."""
        return [self.labels[i] for i in sorted(self.labels)]

    @property
    def num_classes(self) -> int:
        """Number of label ids including background."""
        return len(self.labels)

    @property
    def num_channels(self) -> int:
        """Number of image channels (from ``modality``; 1 when not given)."""
        return max(1, len(self.modality))

    def _split_indices(self) -> tuple:
        n = len(self.training)
        if self.validation_fraction <= 0 or n < 2:
            return list(range(n)), []
        n_val = min(n - 1, max(1, int(round(self.validation_fraction * n))))
        perm = np.random.default_rng(self.seed).permutation(n)
        val = sorted(int(i) for i in perm[:n_val])
        return [i for i in range(n) if i not in set(val)], val

    def entries(self, split: str = "training") -> list:
        """Cases of a split: "training", "validation", "test" or "all" (= every training case).

        Returns:
            list of :class:`Entry`, in json order.
        """
        if split not in SPLITS:
            raise InputError(f"split: expected one of {SPLITS}, got {split!r}")
        if split == "test":
            return list(self.test)
        if split == "all":
            return list(self.training)
        if self.validation is not None:
            if split == "validation":
                return list(self.validation)
            held = {_real(e.image) for e in self.validation}
            return [e for e in self.training if _real(e.image) not in held]
        train_idx, val_idx = self._split_indices()
        return [self.training[i] for i in (train_idx if split == "training" else val_idx)]

    def preprocessor_for(self, preprocessor: Optional[Preprocessor] = None) -> Preprocessor:
        """``preprocessor`` (default ``Preprocessor()``) with this manifest's label map added."""
        p = preprocessor if preprocessor is not None else Preprocessor()
        if self.label_map is not None and p.label_map is None:
            p = dataclasses.replace(
                p, label_map=self.label_map, unknown_labels=self.unknown_labels
            )
        return p

    # ------------------------------------------------------------------ validation

    def _all_entries(self) -> list:
        out = [("training", i, e) for i, e in enumerate(self.training)]
        if self.validation is not None:
            out += [("validation", i, e) for i, e in enumerate(self.validation)]
        out += [("test", i, e) for i, e in enumerate(self.test)]
        return out

    def validate(self, *, check_data: bool = True, cache_dir: Optional[PathLike] = None) -> None:
        """Check every case and raise one :class:`ManifestError` listing every problem.

        Checks: files exist; no file listed twice (a case in both validation and training
        counts only when the validation list is separate); images 3D or 4D, labels 3D; image and
        label shapes and affines agree; with ``check_data``: files decode, intensities finite,
        labels are integers within the label ids (or the label map), and have foreground, and
        every original id the label map lists occurs in some label file.

        Args:
            check_data: decode the files (else headers only).
            cache_dir: remember a successful validation there (keyed by every file's size,
                modification time and inode, the labels and the label map), so training
                runs on unchanged data do not decode everything again.

        Raises:
            ManifestError: with all problems, each naming its file.
        """
        marker = None
        if cache_dir is not None and check_data:
            marker = Path(cache_dir) / f"validated-{self._validation_key()}.json"
            if marker.is_file():
                return
        self._validate(check_data)
        if marker is not None:
            from tf_explog.files import write_json

            write_json(marker, {"dataset": str(self.path), "cases": len(self._all_entries())})

    def _validation_key(self) -> str:
        sources = []
        for _, _, e in self._all_entries():
            for p in (e.image, e.label):
                if p is None:
                    continue
                try:
                    st = os.stat(p)
                    sources.append([str(_real(p)), st.st_size, st.st_mtime_ns, st.st_ino])
                except OSError:
                    sources.append([str(p), None])
        payload = {"sources": sources, "labels": self.labels, "label_map": self.label_map,
                   "unknown": self.unknown_labels, "modality": self.modality, "format": 1}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def _validate(self, check_data: bool) -> None:
        problems: list = []
        entries = self._all_entries()
        held = {_real(e.image) for e in (self.validation or [])}
        # Duplicates: a file listed by more than one entry (validation cases may repeat
        # training ones, which then count once).
        uses: dict = {}
        for split, i, e in entries:
            if split == "training" and _real(e.image) in held:
                continue
            for role, p in (("image", e.image), ("label", e.label)):
                if p is not None:
                    uses.setdefault(_real(p), []).append(f"{split}[{i}].{role}")
        for p, where in uses.items():
            if len(where) > 1:
                problems.append(f"{p}: listed {len(where)} times ({', '.join(where)})")

        allowed = set(self.labels)
        found_values: set = set()
        labels_read = 0
        for split, i, e in entries:
            missing = [p for p in (e.image, e.label) if p is not None and not p.is_file()]
            for p in missing:
                if p.is_symlink() and not p.exists():
                    problems.append(f"{p}: a symbolic link that loops or points to a missing "
                                    f"file ({split}[{i}])")
                else:
                    problems.append(f"{p}: file not found ({split}[{i}])")
            if missing:
                continue
            try:
                img_shape, img_aff = read_header(e.image)
            except NiftiError as exc:
                problems.append(str(exc))
                continue
            if len(img_shape) not in (3, 4):
                problems.append(
                    f"{e.image}: image has {len(img_shape)} dimensions {img_shape}; "
                    "expected 3D or 4D"
                )
                continue
            if len(img_shape) == 3 and len(self.modality or ()) > 1:
                problems.append(
                    f"{e.image}: a 3D image (one channel) but 'modality' lists "
                    f"{len(self.modality)} channels"
                )
            if len(img_shape) == 4 and self.modality and img_shape[3] != len(self.modality):
                problems.append(
                    f"{e.image}: {img_shape[3]} channels but 'modality' lists {len(self.modality)}"
                )
            lab_ok = e.label is not None
            if e.label is not None:
                try:
                    lab_shape, lab_aff = read_header(e.label)
                except NiftiError as exc:
                    problems.append(str(exc))
                    lab_ok = False
                else:
                    if tuple(lab_shape[:3]) != tuple(img_shape[:3]) or not (
                        len(lab_shape) == 3 or (len(lab_shape) == 4 and lab_shape[3] == 1)
                    ):
                        problems.append(
                            f"{e.label}: label shape {lab_shape} does not match image "
                            f"{e.image.name} shape {img_shape[:3]}"
                        )
                        lab_ok = False
                    elif not affines_close(lab_aff, img_aff):
                        problems.append(
                            f"{e.label}: affine does not match image {e.image.name} "
                            f"(max difference {np.abs(lab_aff - img_aff).max():.4g})"
                        )
            if not check_data:
                continue
            try:
                load_volume(e.image, kind="image")
            except NiftiError as exc:
                problems.append(str(exc))
            if not lab_ok:
                continue
            try:
                lab = load_volume(e.label, kind="label").array
            except NiftiError as exc:
                problems.append(str(exc))
                continue
            values = set(int(v) for v in np.unique(lab))
            found_values |= values
            labels_read += 1
            if self.label_map is not None:
                table = LabelMap.coerce(self.label_map).forward_table()
                outside = sorted(values - set(table))
                if outside and self.unknown_labels == "raise":
                    problems.append(
                        f"{e.label}: label values {outside} are not in the label map "
                        f"{self.label_map_source} (data.unknown_labels: background maps "
                        "them to 0)")
                mapped = {table.get(v, 0) for v in values}
            else:
                outside = sorted(values - allowed)
                if outside:
                    problems.append(
                        f"{e.label}: label values {outside} are outside the label ids "
                        f"{sorted(allowed)}"
                    )
                mapped = values
            if not (mapped - {0}):
                problems.append(f"{e.label}: no foreground (every voxel is background)")
        if self.label_map is not None and labels_read:
            lm = LabelMap.coerce(self.label_map)
            for cls, ids in lm.mapping.items():
                absent = [v for v in ids if v not in found_values]
                if absent:
                    problems.append(
                        f"{self.label_map_source}: class {cls} lists original id(s) {absent} "
                        f"that no label file of the data set contains (a typo?)")
        if problems:
            raise ManifestError(problems, self.path)


# ---------------------------------------------------------------------- label frequencies


def _frequency_key(manifest: Manifest, entries: list, preprocessor: Optional[Preprocessor]) -> str:
    sources = []
    for e in entries:
        st = os.stat(e.label)
        sources.append([str(e.label.resolve()), st.st_size, st.st_mtime_ns, st.st_ino])
    payload = {
        "sources": sources,
        "preprocessor": preprocessor.fingerprint() if preprocessor is not None else None,
        "label_map": manifest.label_map,
        "num_classes": manifest.num_classes,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def label_frequencies(
    manifest: Union[Manifest, PathLike],
    preprocessor: Optional[Preprocessor] = None,
    cache_dir: Optional[PathLike] = None,
    *,
    split: str = "training",
    normalize: bool = False,
) -> np.ndarray:
    """Voxel count of every label over a split (default: training, validation held out).

    Counts are taken after the label map and, when ``preprocessor`` is given, after
    preprocessing (so they match what the network sees). They feed
    ``class_weights_from_frequencies`` (``w_k = (Σ_j f_j / f_k) ** 0.5``, scale-free, so counts
    and fractions give the same weights).

    Args:
        manifest: a :class:`Manifest` or a path to ``dataset.json``.
        preprocessor: count on preprocessed labels (read from a :class:`VolumeCache` in
            ``cache_dir``) instead of the raw files.
        cache_dir: where to cache the result (and the preprocessed volumes); None: no cache.
            The cached result is invalidated when a label file, the preprocessing, the label
            map or the number of labels changes.
        split: which cases to count.
        normalize: return fractions summing to 1 instead of counts.

    Returns:
        ``[num_classes]`` int64 counts (float64 fractions with ``normalize``).

    Raises:
        ManifestError: a case has no label file or values outside the label ids.
    """
    if not isinstance(manifest, Manifest):
        manifest = Manifest.load(manifest)
    entries = [e for e in manifest.entries(split)]
    unlabelled = [str(e.image) for e in entries if e.label is None]
    if unlabelled:
        raise ManifestError([f"{p}: no label file" for p in unlabelled], manifest.path)
    if preprocessor is not None:
        preprocessor = manifest.preprocessor_for(preprocessor)
    cache_file = None
    if cache_dir is not None:
        key = _frequency_key(manifest, entries, preprocessor)
        cache_file = Path(cache_dir) / f"label_frequencies-{key}.json"
        try:
            with open(cache_file) as f:
                counts = np.asarray(json.load(f)["counts"], dtype=np.int64)
            if counts.shape == (manifest.num_classes,):
                return counts / counts.sum() if normalize else counts
        except (FileNotFoundError, KeyError, ValueError, json.JSONDecodeError):
            pass

    counts = np.zeros(manifest.num_classes, dtype=np.int64)
    problems = []

    def add(values: np.ndarray, n: np.ndarray, source) -> None:
        bad = values[(values < 0) | (values >= manifest.num_classes)]
        if bad.size:
            problems.append(
                f"{source}: label values {sorted(bad.tolist())} outside "
                f"0..{manifest.num_classes - 1}"
            )
            return
        np.add.at(counts, values, n)

    if preprocessor is not None and cache_dir is not None:
        from .cache import VolumeCache

        cache = VolumeCache(cache_dir, preprocessor)
        for e in entries:
            present = cache.present_labels(*e.pair)
            add(np.array(list(present), dtype=np.int64),
                np.array([v["count"] for v in present.values()], dtype=np.int64), e.label)
    else:
        for e in entries:
            if preprocessor is not None:
                _, lab, _ = preprocessor.forward(
                    load_volume(e.image, kind="image"), load_volume(e.label, kind="label")
                )
            else:
                lab = load_volume(e.label, kind="label").array
                if manifest.label_map is not None:
                    lab = apply_label_map(
                        lab, manifest.label_map, manifest.unknown_labels, source=e.label
                    )
            values, n = np.unique(lab, return_counts=True)
            add(values.astype(np.int64), n.astype(np.int64), e.label)
    if problems:
        raise ManifestError(problems, manifest.path)
    if cache_file is not None:
        from tf_explog.files import write_json

        write_json(cache_file, {"counts": counts.tolist(), "split": split}, indent=None)
    return counts / counts.sum() if normalize else counts
