"""Whole-volume inference on files: a trained run (or a ``.keras`` file) segments NIfTI scans.

:func:`predict_files` preprocesses each scan as the run was trained, predicts it with
:func:`tf_explog.sliding_window.predict_volume` (sliding windows blended with a Gaussian
importance map, optional flip TTA, on the device by default — see that module for the
formula), inverts the preprocessing and writes label maps (and optionally probabilities)
that overlay the inputs voxel for voxel (same shape, affine and orientation).
:func:`load_predictor` loads a run directory, a ``.keras`` file or an in-memory model.

``predict_volume``, ``gaussian_importance_map``, ``sliding_window_weights`` and
``window_starts`` are re-exported here for convenience; they live in
:mod:`tf_explog.sliding_window` and :mod:`tf_explog.geometry`. Run directories are read
through :class:`tf_explog.runs.Run`. NumPy and Keras; no TensorFlow.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import keras
import numpy as np

from tf_explog.data.nifti import (
    NiftiError,
    NiftiFileNotFoundError,
    canonical_geometry,
    invert_label_map,
    list_nifti_files,
    load_volume,
    nifti_stem,
    save_like,
)
from tf_explog.data.preprocess import (
    Preprocessor,
    invert_labels,
    invert_probabilities,
    resamples,
)
from tf_explog.errors import InferenceError, ModelNotFoundError
from tf_explog.files import remove_stale_temporaries, temporary_name
from tf_explog.geometry import window_starts
from tf_explog.sliding_window import (
    gaussian_importance_map,
    model_input,
    predict_volume,
    sliding_window_weights,
)

__all__ = [
    "InferenceError",
    "ModelNotFoundError",
    "Predictor",
    "load_predictor",
    "predict_volume",
    "predict_files",
    "gaussian_importance_map",
    "window_starts",
    "sliding_window_weights",
    "output_paths",
]

PathLike = Union[str, os.PathLike]

WEIGHT_FLOOR = 1e-3  # MONAI's minimum importance, so no voxel of a window has weight 0
PROBABILITIES_SUFFIX = "_probabilities.nii.gz"
# accumulate="int16": probabilities in [0, 1] as multiples of 1/30000 (sums stay below the
# int16 maximum 32767 whatever the rounding of up to ~5000 window contributions).
FIXED_POINT_SCALE = 30000.0


# --------------------------------------------------------------------------------------------
# Models and run directories
# --------------------------------------------------------------------------------------------


@dataclass
class Predictor:
    """A model ready for :func:`predict_files`, with what is needed around it.

    Attributes:
        model: the Keras model.
        preprocessor: the training preprocessing (z-score only for a bare ``.keras`` file).
        label_names: names by label id (None when unknown).
        window: the training patch size (patch-mode runs) or None (whole volumes).
        source: where the model came from.
    """

    model: keras.Model
    preprocessor: Preprocessor
    label_names: Optional[list]
    window: Optional[tuple]
    source: str


def load_keras_model(path: PathLike) -> keras.Model:
    """A trained ``.keras`` model, with the package's custom objects, refused if any weight is
    NaN or Inf (such a model cannot segment anything).

    Raises:
        ModelNotFoundError: no such file.
        InferenceError: not a ``.keras`` file, unreadable, or non-finite weights.
    """
    # Importing these registers the package's custom layers/losses/metrics for deserialisation.
    import tf_explog.layers  # noqa: F401
    import tf_explog.losses  # noqa: F401
    import tf_explog.metrics  # noqa: F401  (registrations)
    from tf_explog.models import non_finite_weights

    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: model file not found")
    if path.suffix != ".keras":
        raise InferenceError(f"{path}: expected a run directory or a .keras model file")
    import zipfile

    # Keras reports a truncated archive as "File not found": say what it is.
    if not zipfile.is_zipfile(path):
        raise InferenceError(f"{path}: could not load the Keras model: not a complete .keras "
                             "archive (truncated or corrupt, not a readable zip file); use "
                             "another checkpoint or re-save it")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for a corrupt archive
        raise InferenceError(f"{path}: could not load the Keras model "
                             f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(model, keras.Model):
        raise InferenceError(f"{path}: expected a Keras model, got {type(model).__name__}")
    bad = non_finite_weights(model)
    if bad:
        raise InferenceError(f"{path}: {len(bad)} weight tensor(s) hold NaN/Inf (first: "
                             f"{bad[0]}); this model cannot segment anything")
    return model


def load_predictor(model: Union[PathLike, keras.Model]) -> Predictor:
    """Load a run directory, a ``.keras`` file or wrap an in-memory model.

    A run directory supplies the preprocessor, label names and (patch-mode runs) the window
    from ``run.json`` and loads ``checkpoints/best.keras`` (``final.keras`` when there is no
    best checkpoint). A ``.keras`` file or a model gets a plain whole-volume z-score.

    Args:
        model: run directory, ``.keras`` file or ``keras.Model``.

    Returns:
        A :class:`Predictor`.

    Raises:
        ModelNotFoundError / FileNotFoundError: missing path, run.json or checkpoint.
        InferenceError: unreadable model file or malformed run.json.
    """
    if isinstance(model, keras.Model):
        return Predictor(model, Preprocessor(normalization="zscore"), None, None, "<in-memory model>")
    path = Path(model)
    if not path.exists():
        raise ModelNotFoundError(
            f"{path}: not found; expected a run directory (with run.json) or a .keras model file"
        )
    from tf_explog.folding import fold_batchnorm

    # BatchNorm folded into the convolutions: the same outputs, fewer operations per volume.
    if not path.is_dir():
        return Predictor(fold_batchnorm(load_keras_model(path)),
                         Preprocessor(normalization="zscore"), None, None, str(path))

    from tf_explog.runs import Run

    run = Run.open(path)
    preprocessor, label_names, window = run.preprocessor, run.label_names, run.window
    checkpoint = run.checkpoint("best")  # the final model when there is no best one
    keras_model = load_keras_model(checkpoint)
    _, channels = model_input(keras_model)
    expected = run.num_channels
    if expected is not None and channels is not None and expected != channels:
        raise InferenceError(
            f"{path / 'run.json'}: num_channels={expected} but {checkpoint} expects "
            f"{channels} channel(s)"
        )
    return Predictor(fold_batchnorm(keras_model), preprocessor, label_names, window, str(path))


# --------------------------------------------------------------------------------------------
# predict_files
# --------------------------------------------------------------------------------------------


def _list_inputs(inputs: PathLike) -> list:
    path = Path(inputs)
    if not path.exists():
        raise NiftiFileNotFoundError(f"{path}: input not found; expected a NIfTI file or a "
                                     "directory of them")
    if path.is_dir():
        return list_nifti_files(path, "input")
    if nifti_stem(path.name) is None:
        raise NiftiError(f"{path}: not a NIfTI file (expected a .nii or .nii.gz name)")
    return [path]


def output_paths(input_path: PathLike, output_dir: PathLike) -> tuple:
    """``(segmentation path, probabilities path)`` for one input file.

    The segmentation keeps the input's file name; probabilities go to
    ``<name without .nii/.nii.gz>_probabilities.nii.gz``.
    """
    name = Path(input_path).name
    out = Path(output_dir)
    return out / name, out / (nifti_stem(name) + PROBABILITIES_SUFFIX)


def _to_original_labels(probs, record, preprocessor: Preprocessor, want_probabilities: bool,
                        ids: str = "original"):
    """Canonical-grid label ids (and probabilities) from probabilities on the preprocessed grid.

    With only crops/pads in the record, ``argmax`` then :func:`invert_labels` is exact and
    identical to inverting the probabilities first (pure index selection; cropped-away regions
    are background either way), and avoids a ``K``-channel copy at full size. With any
    resampling, probabilities are resampled linearly first (as nnU-Net does), then argmax, so
    the written labels are the argmax of the written probabilities.
    """
    resampled = resamples(record)
    canon_probs = None
    if resampled or want_probabilities:
        canon_probs = invert_probabilities(probs, record)
    if resampled:
        labels = np.argmax(canon_probs, axis=-1).astype(np.int32)
    else:
        labels = invert_labels(np.argmax(probs, axis=-1).astype(np.int32), record)
    if preprocessor.label_map is not None and ids == "original":
        labels = invert_label_map(labels, preprocessor.label_map)
    return labels, canon_probs


def _stage(array, volume, path: Path) -> Path:
    """``save_like`` to a temporary name next to ``path`` (renamed later); an OSError names
    ``path``, not the temporary file."""
    tmp = temporary_name(path)
    try:
        return save_like(array, volume, tmp)
    except OSError as err:
        if err.errno is not None and os.fspath(err.filename or "") == os.fspath(tmp):
            raise type(err)(err.errno, err.strerror, os.fspath(path)) from err
        raise


def predict_files(
    model: Union[PathLike, keras.Model],
    inputs: PathLike,
    output_dir: PathLike,
    *,
    overwrite: bool = False,
    save_probabilities: bool = False,
    tta: Union[bool, Sequence[int]] = False,
    window: Union[None, int, Sequence[int]] = None,
    window_batch: int = 1,
    overlap: float = 0.5,
    progress: bool = True,
    ids: str = "original",
    accumulate: str = "float32",
) -> list:
    """Segment NIfTI files into label maps aligned voxel for voxel with the inputs.

    For each file: read and reorient to canonical RAS (:func:`load_volume`), preprocess as in
    training (``Preprocessor.forward``, image only), :func:`predict_volume`, undo the
    preprocessing onto the canonical input grid (see :func:`_to_original_labels` for the
    exact order), map label ids back to original label values when the preprocessor has a
    label map, and write with :func:`save_like`: the output has the input's shape, affine,
    orientation and header.

    With a label map, ``ids="original"`` writes each class as the *first* original id it
    lists (a class merging left and right, ``{"1": [2, 41]}``, is written as 2 everywhere:
    the network cannot tell the sides apart once they are one class); ``ids="class"``
    writes the class indices themselves (evaluate those with ``pred_ids="class"``).

    Every input header and every output path (none may replace an input or another output)
    is checked before anything is written, and outputs are renamed into place only once
    every input was read and segmented: a bad input, a full disk or a kill leaves no new
    output (and a missing ``output_dir`` is not left behind).

    Args:
        model: run directory (``run.json`` + ``checkpoints/best.keras``), ``.keras`` file
            (z-score normalisation only, label ids written as they are) or a ``keras.Model``.
        inputs: a .nii/.nii.gz file or a directory of them (hidden files skipped).
        output_dir: created if missing; outputs keep the input file names.
        overwrite: replace existing outputs.
        save_probabilities: also write ``<name>_probabilities.nii.gz`` (float32, 4D
            ``[..., K]`` on the input's grid).
        tta: flip test-time augmentation (see :func:`predict_volume`).
        window: sliding-window size; default: the run's patch size (patch-mode runs), else
            whole volumes.
        window_batch: windows per model call.
        overlap: sliding-window overlap fraction.
        progress: show a progress bar.
        ids: "original" (label-map runs: original ids, see above) or "class".
        accumulate: the sliding-window accumulator's dtype on the device (see
            :func:`predict_volume`): "float32", or "int16" / "float16" for half the memory.

    Returns:
        The written segmentation paths, in input order.

    Raises:
        ModelNotFoundError / FileNotFoundError: missing model path, run directory or run.json.
        InferenceError / NiftiError (ValueErrors): unreadable model, input that is not a NIfTI,
            wrong dimensionality or channel count, an output that would replace an input or
            another input's output.
        FileExistsError: an output exists and ``overwrite`` is false (nothing is written).
    """
    if ids not in ("original", "class"):
        raise InferenceError(f"ids: expected 'original' or 'class', got {ids!r}")
    if accumulate not in ("float32", "float16", "int16"):  # before any model or file is read
        raise InferenceError(f"accumulate: expected 'float32', 'float16' or 'int16', got "
                             f"{accumulate!r}")
    predictor = load_predictor(model)
    files = _list_inputs(inputs)
    _, channels = model_input(predictor.model)
    output_dir = Path(output_dir)

    targets = []
    inputs_real = {f.resolve() for f in files if f.exists()}
    claimed: dict = {}  # output path -> the input that writes it
    for f in files:
        _, _, n_channels = canonical_geometry(f)  # header only: wrong dims raise NiftiError here
        if channels is not None and n_channels != channels:
            raise InferenceError(
                f"{f}: has {n_channels} channel(s), the model ({predictor.source}) expects {channels}"
            )
        seg, prob = output_paths(f, output_dir)
        if seg.resolve() == f.resolve():
            raise InferenceError(f"{f}: output would replace the input; choose another output_dir")
        for out in (seg, prob) if save_probabilities else (seg,):
            if out.resolve() in inputs_real:
                raise InferenceError(f"{f}: its output {out} would replace the input {out}; "
                                     "choose another output_dir")
            if out in claimed:
                raise InferenceError(f"{f}: its output {out} is also the output of "
                                     f"{claimed[out]}; rename one of the inputs")
            claimed[out] = f
        targets.append((f, seg, prob))
    if not overwrite:
        existing = [str(p) for _, seg, prob in targets
                    for p in ((seg, prob) if save_probabilities else (seg,)) if p.exists()]
        if existing:
            raise FileExistsError(
                f"{len(existing)} output(s) already exist (pass --overwrite, or "
                "overwrite=True, to replace them): "
                + ", ".join(existing[:5]) + (" ..." if len(existing) > 5 else "")
            )

    window = predictor.window if window is None else window
    bar = keras.utils.Progbar(len(targets), unit_name="volume") if progress else None
    # Every output is written under a temporary name and renamed into place only once all
    # inputs were read and segmented: a bad input (or a kill) leaves no output at all.
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_dir)  # left by a predict that was killed
    staged = []
    try:
        for i, (f, seg, prob) in enumerate(targets):
            volume = load_volume(f, kind="image")
            image, _, record = predictor.preprocessor.forward(volume)
            probs = predict_volume(predictor.model, image, window=window, overlap=overlap,
                                   tta=tta, window_batch=window_batch,
                                   accumulate=accumulate)
            names = predictor.label_names
            if names is not None and probs.shape[-1] != len(names):
                raise InferenceError(
                    f"{predictor.source}: the model predicts {probs.shape[-1]} labels but "
                    f"run.json lists {len(names)} label names"
                )
            labels, canon_probs = _to_original_labels(probs, record, predictor.preprocessor,
                                                      save_probabilities, ids)
            staged.append((_stage(labels, volume, seg), seg))
            if save_probabilities:
                staged.append((_stage(canon_probs, volume, prob), prob))
            if bar is not None:
                bar.update(i + 1)
        for tmp, final in staged:
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                output_dir.rmdir()  # only if still empty
        raise
    return [seg for _, seg, _ in targets]
