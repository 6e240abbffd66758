"""Your own data in five minutes: lay out a ``dataset.json`` from folders, and check one.

- :func:`init_dataset` pairs the NIfTI files of an image folder and a label folder by name
  (``case01.nii.gz`` with ``case01.nii.gz``, or ``case01_seg.nii.gz``), reads the label ids
  the label files hold, and writes an MSD ``dataset.json`` (paths relative to it), checked
  before it replaces anything. Ids that are not ``0..K-1`` (e.g. FreeSurfer's 2, 41, ...)
  get a ``label_map`` so the network still sees classes ``0..K-1``.
- :func:`check_dataset` lists every problem of a data set, one line each naming its file
  (what ``Manifest.validate`` finds: missing or undecodable files, shapes or affines that
  differ between image and label, label values outside the ids, labels with no foreground).

``tf-explog dataset init`` and ``tf-explog dataset check`` call them. TensorFlow-free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from tf_explog.errors import InputError

from .manifest import Manifest, ManifestError
from .nifti import NiftiError, list_nifti_files, load_volume, nifti_stem, read_header

__all__ = ["DatasetCheck", "check_dataset", "init_dataset", "pair_files", "LABEL_SUFFIXES"]

PathLike = Union[str, os.PathLike]

#: Suffixes a label file's name may add to its image's (``case01`` -> ``case01_seg``).
LABEL_SUFFIXES = ("", "_seg", "_label", "_labels", "_mask", "_gt", "-seg", "-label")
#: Suffix of the first channel in the nnU-Net layout (``case01_0000.nii.gz``).
_CHANNEL_SUFFIX = "_0000"


def _image_key(stem: str) -> str:
    return stem[: -len(_CHANNEL_SUFFIX)] if stem.endswith(_CHANNEL_SUFFIX) else stem


def _label_key(stem: str, image_keys: set) -> str:
    for suffix in sorted(LABEL_SUFFIXES, key=len, reverse=True):
        if suffix and stem.endswith(suffix) and stem[: -len(suffix)] in image_keys:
            return stem[: -len(suffix)]
    return stem


def pair_files(images_dir: PathLike, labels_dir: PathLike) -> tuple:
    """Pairs image and label files by name.

    A label matches the image of the same name, also with one of `LABEL_SUFFIXES` added,
    and an image name may end in nnU-Net's ``_0000``.

    Returns:
        ``(pairs [(case id, image, label)] sorted by id, problems [one line per file that
        has no partner or is ambiguous]``).

    Raises:
        InputError: a folder is missing or holds no NIfTI file.
    """
    try:
        images = list_nifti_files(images_dir, "images")
        labels = list_nifti_files(labels_dir, "labels")
    except NiftiError as err:
        raise InputError(str(err)) from None
    by_key: dict = {}
    for path in images:
        by_key.setdefault(_image_key(nifti_stem(path.name)), []).append(path)
    problems = [f"{paths[1]}: same case name as {paths[0].name} (one image per case)"
                for paths in by_key.values() if len(paths) > 1]
    label_of: dict = {}
    for path in labels:
        key = _label_key(nifti_stem(path.name), set(by_key))
        if key in label_of:
            problems.append(f"{path}: a second label for case {key!r} "
                            f"({label_of[key].name} is the first)")
            continue
        if key not in by_key:
            problems.append(f"{path}: no image named {key}.nii.gz (or .nii) in {images_dir}")
            continue
        label_of[key] = path
    for key in sorted(by_key):
        if key not in label_of:
            problems.append(f"{by_key[key][0]}: no label file named {key}.nii.gz (or with "
                            f"_seg, _label or _mask) in {labels_dir}")
    pairs = [(key, by_key[key][0], label_of[key]) for key in sorted(by_key) if key in label_of]
    return pairs, problems


def _relative(path: Path, root: Path) -> str:
    rel = os.path.relpath(Path(path).resolve(), root.resolve())
    return rel if rel.startswith("..") else f"./{rel}"


def init_dataset(images: PathLike, labels: PathLike, out: PathLike, *,
                 test_images: Optional[PathLike] = None,
                 label_names: Optional[Sequence[str]] = None,
                 modality: Sequence[str] = ("image",), name: Optional[str] = None,
                 overwrite: bool = False) -> dict:
    """Writes an MSD ``dataset.json`` for the image/label folders, atomically, once valid.

    Args:
        images: folder of training images (NIfTI).
        labels: folder of their label files (matched by name, see :func:`pair_files`).
        out: the ``dataset.json`` to write (its folder may be anywhere: paths are stored
            relative to it).
        test_images: optional folder of images without labels (the ``test`` list).
        label_names: a name per class, background first; default ``background``,
            ``label_<id>``.
        modality: a name per image channel.
        name: the data set's name (default: the folder of ``out``).
        overwrite: replace an existing ``out``.

    Returns:
        The written JSON object.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is false (checked first).
        ManifestError: files without a partner, unreadable files, or a data set that does
            not validate; every problem listed, each naming its file. Nothing is written.
    """
    from tf_explog.files import atomic_path, write_json

    out = Path(out)
    if out.is_dir():
        out = out / "dataset.json"
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists; pass --overwrite to replace it")
    pairs, problems = pair_files(images, labels)
    # The label ids present: the classes (0..K-1 directly, else through a label map).
    ids: set = set()
    for _, _, label in pairs:
        try:
            ids |= {int(v) for v in np.unique(load_volume(label, kind="label").array)}
        except NiftiError as err:
            problems.append(str(err))
    if problems:
        raise ManifestError(problems, out)
    if not pairs:
        raise ManifestError(f"{images}: no image has a label file", out)
    ids |= {0}
    originals = sorted(ids)
    direct = originals == list(range(len(originals)))
    if label_names is not None:
        label_names = [str(n) for n in label_names]
        if len(label_names) != len(originals):
            raise InputError(f"--label-names: {len(label_names)} names for "
                             f"{len(originals)} label ids found in {labels} "
                             f"({originals}, background included)")
    else:
        label_names = ["background"] + [f"label_{i}" for i in originals[1:]]
    root = out.parent
    raw = {
        "name": name or root.resolve().name,
        "description": f"written by tf-explog dataset init from {images} and {labels}",
        "tensorImageSize": "3D",
        "modality": {str(i): str(m) for i, m in enumerate(modality)},
        "labels": {str(i): n for i, n in enumerate(label_names)},
        "numTraining": len(pairs),
        "training": [{"image": _relative(image, root), "label": _relative(label, root)}
                     for _, image, label in pairs],
        "test": [],
    }
    if not direct:
        raw["label_map"] = {str(k): [v] for k, v in enumerate(originals) if k > 0}
    if test_images is not None:
        try:
            tests = list_nifti_files(test_images, "test images")
        except NiftiError as err:
            raise InputError(str(err)) from None
        raw["test"] = [_relative(p, root) for p in tests]
    raw["numTest"] = len(raw["test"])
    # Written under a temporary name in the same folder (same relative paths), checked there,
    # and renamed: a data set that does not validate never replaces anything.
    try:
        with atomic_path(out, overwrite=overwrite) as tmp:
            write_json(tmp, raw, indent=2)
            Manifest.load(tmp).validate(check_data=True)
    except ManifestError as err:
        raise ManifestError([p.replace(tmp.name, out.name) for p in err.problems],
                            out) from None
    return raw


@dataclass
class DatasetCheck:
    """What :func:`check_dataset` found."""

    path: Path
    problems: list
    manifest: Optional[Manifest] = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line: the cases, classes, channels and the first image's shape."""
        m = self.manifest
        if m is None:
            return f"{self.path}: not readable"
        line = (f"{self.path}: {len(m.training)} labelled case(s), {len(m.test)} test "
                f"image(s), {m.num_classes} classes (background included), "
                f"{m.num_channels} channel(s)")
        if m.label_map is not None:
            line += ", with a label_map"
        if m.training:
            try:
                shape, affine = read_header(m.training[0].image)
                spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
                line += (f"; first image {'x'.join(str(s) for s in shape[:3])} voxels of "
                         f"{'x'.join(f'{s:.3g}' for s in spacing)} mm")
            except (NiftiError, OSError):
                pass
        return line


def _naming_file(problem: str, dataset: Path) -> str:
    """The problem as one line that starts with a file: structural problems of the json
    (``training[3]: missing 'label'``) get the json's path in front."""
    first = problem.split(":", 1)[0]
    if os.path.isabs(first) or first.endswith((".json", ".nii", ".nii.gz")):
        return " ".join(problem.split())
    return f"{dataset}: {' '.join(problem.split())}"


def check_dataset(path: PathLike, *, check_data: bool = True) -> DatasetCheck:
    """Every problem of a data set (``dataset.json`` or its folder), one line each.

    Args:
        path: the json file, or the folder holding ``dataset.json``.
        check_data: decode every file (else headers only: faster, finds less).

    Returns:
        A :class:`DatasetCheck`; ``problems`` is empty when the data set is usable.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    try:
        manifest = Manifest.load(path)
    except ManifestError as err:
        return DatasetCheck(path, [_naming_file(p, path) for p in err.problems])
    try:
        manifest.validate(check_data=check_data)
    except ManifestError as err:
        return DatasetCheck(path, [_naming_file(p, path) for p in err.problems], manifest)
    return DatasetCheck(path, [], manifest)
