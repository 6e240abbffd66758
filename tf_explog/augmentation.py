"""Random 3D affine augmentation (rotation, shift, zoom) of image/label pairs in keras.ops.

The paper augments each training volume with rotation, shifting and scaling, each volume
being transformed with probability 0.8; the first author's later code uses ±30° about one
axis, ±20% shift and zoom 0.8–1.2, which are the defaults here. The same transform is
applied to the image (trilinear) and to the labels (nearest), about the volume centre, with
zeros / background outside the input.

Everything is written with ``keras.ops`` and ``keras.random``, so it runs on the TensorFlow
backend (eagerly, in a model, or inside ``tf.data.Dataset.map``) and on JAX; this module does
not import TensorFlow.

Conventions (voxel index space, axes 0, 1, 2 = D, H, W; canonical RAS volumes: x, y, z):

- A rotation by +θ about axis ``a`` turns axis ``a+1`` towards axis ``a+2`` (indices mod 3),
  i.e. +90° about axis 0 equals ``np.rot90(vol, 1, axes=(1, 2))``, about axis 1
  ``axes=(2, 0)`` and about axis 2 ``axes=(0, 1)``. With several axes the rotations are
  applied about axis 0 first, then 1, then 2 (R = R2 · R1 · R0).
- Zoom z > 1 enlarges the content (isotropic). Shift s moves the content by s × size voxels
  along each axis.
- The forward map is ``x_out = R · z · (x_in − c) + c + s`` with c = (size − 1) / 2; it
  is applied by sampling the input at ``x_in = M · x_out + b``, where M = (R · z)⁻¹ and
  b = c − M (c + s).

Reference: Wong et al., MICCAI 2018 (augmentation: rotation, shifting, scaling, p = 0.8);
see docs/paper.md §3.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
from keras import ops
from tf_explog.errors import InputError

__all__ = ["RandomAffine3D", "random_affine_3d", "apply_affine_3d", "affine_matrices_3d"]

_INTERPOLATIONS = ("linear", "nearest")


# --------------------------------------------------------------------------------------
# Argument validation (shared by the layer and the functions)
# --------------------------------------------------------------------------------------


def _range(name: str, value: Any, symmetric: bool, lower: float | None = None
           ) -> tuple[float, float]:
    """Turn a max-abs number (symmetric) or a (low, high) pair into a checked range."""
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lo, hi = ((-float(value), float(value)) if symmetric
                      else (float(value), float(value)))
            if symmetric and value < 0:
                raise ValueError
        else:
            lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        what = "a number ≥ 0 or a (low, high) pair" if symmetric else "a (low, high) pair"
        raise InputError(f"RandomAffine3D: argument '{name}' must be {what}, got {value!r}"
                         ) from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise InputError(
            f"RandomAffine3D: argument '{name}' must be finite with low ≤ high, got {value!r}"
        )
    if lower is not None and lo <= lower:
        raise InputError(f"RandomAffine3D: argument '{name}' must be > {lower}, got {value!r}")
    return lo, hi


def _axes(value: Any) -> tuple[int, ...]:
    if value == "all":
        return (0, 1, 2)
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    try:
        axes = tuple(value)
    except TypeError:
        axes = None
    if axes is None or not all(
        isinstance(a, int) and not isinstance(a, bool) and a in (0, 1, 2) for a in axes
    ) or len(set(axes)) != len(axes):
        raise InputError(
            "RandomAffine3D: argument 'rotation_axes' must be distinct spatial axes from "
            f"(0, 1, 2) or 'all', got {value!r}"
        )
    return tuple(sorted(axes))


def _check_args(rotation, rotation_axes, shift, zoom, probability, interpolation):
    rot = _range("rotation", rotation, symmetric=True)
    axes = _axes(rotation_axes)
    sh = _range("shift", shift, symmetric=True)
    zm = _range("zoom", zoom, symmetric=False, lower=0.0)
    if (isinstance(probability, bool) or not isinstance(probability, (int, float))
            or not 0.0 <= probability <= 1.0):
        raise InputError(
            f"RandomAffine3D: argument 'probability' must be a number in [0, 1], "
            f"got {probability!r}"
        )
    if interpolation not in _INTERPOLATIONS:
        raise InputError(
            f"RandomAffine3D: argument 'interpolation' must be one of {_INTERPOLATIONS}, "
            f"got {interpolation!r}"
        )
    return rot, axes, sh, zm, float(probability)


# --------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------


def affine_matrices_3d(angles, zoom):
    """Batched forward linear maps ``R2·R1·R0·zoom`` (see the module conventions).

    Args:
        angles: ``[B, 3]`` rotation angles in radians about axes 0, 1, 2.
        zoom: ``[B]`` isotropic zoom factors.

    Returns:
        ``[B, 3, 3]`` float32 matrices acting on (axis 0, axis 1, axis 2) column vectors.
    """
    angles = ops.cast(angles, "float32")
    zoom = ops.cast(zoom, "float32")
    c, s = ops.cos(angles), ops.sin(angles)
    one, zero = ops.ones_like(c[:, 0]), ops.zeros_like(c[:, 0])

    def mat(rows):
        return ops.stack([ops.stack(r, axis=-1) for r in rows], axis=-2)

    # +θ about axis a turns axis a+1 towards a+2.
    r0 = mat([[one, zero, zero], [zero, c[:, 0], -s[:, 0]], [zero, s[:, 0], c[:, 0]]])
    r1 = mat([[c[:, 1], zero, s[:, 1]], [zero, one, zero], [-s[:, 1], zero, c[:, 1]]])
    r2 = mat([[c[:, 2], -s[:, 2], zero], [s[:, 2], c[:, 2], zero], [zero, zero, one]])
    return ops.matmul(r2, ops.matmul(r1, r0)) * zoom[:, None, None]


def _inverse_maps(angles, zoom, shift_vox, sizes):
    """Sampling maps x_in = M x_out + b for the forward transform of the conventions.

    The inverse of a rotation is its transpose, so M = (1/z) R0ᵀ R1ᵀ R2ᵀ is built
    directly: with zero angles, unit zoom and zero shift M = I and b = 0 exactly.
    """
    fwd_rot = affine_matrices_3d(angles, ops.ones_like(zoom))
    inv = ops.transpose(fwd_rot, (0, 2, 1)) / ops.cast(zoom, "float32")[:, None, None]
    centre = (ops.cast(sizes, "float32") - 1.0) / 2.0  # [3]
    target = centre[None, :] + ops.cast(shift_vox, "float32")  # [B, 3]
    offset = centre[None, :] - ops.sum(inv * target[:, None, :], axis=-1)
    return inv, offset


def _sampling_coords(inv, offset, d, h, w):
    """Input-space coordinates (three ``[B, D, H, W]`` float32 tensors) of every output voxel.

    Elementwise products rather than a matmul keep the identity transform bit-exact.
    """
    grids = (
        ops.reshape(ops.arange(d, dtype="float32"), (1, -1, 1, 1)),
        ops.reshape(ops.arange(h, dtype="float32"), (1, 1, -1, 1)),
        ops.reshape(ops.arange(w, dtype="float32"), (1, 1, 1, -1)),
    )
    coords = []
    for i in range(3):
        acc = offset[:, i][:, None, None, None]
        for j in range(3):
            acc = acc + inv[:, i, j][:, None, None, None] * grids[j]
        coords.append(acc)
    return coords


def _flat_index(b, z, y, x, d, h, w):
    return ((b * d + z) * h + y) * w + x


def _sample_linear(image, coords, sizes):
    """Trilinear sampling of ``[B, D, H, W, C]`` at coords, zero outside the volume.

    Returns:
        ``(values, inside)``: the samples and, per output voxel, the summed weight of the
        corners that fell inside the volume (1 in the interior, 0 far outside).
    """
    bsz, d, h, w = sizes
    channels = ops.shape(image)[-1]
    flat = ops.reshape(image, (-1, channels))
    bidx = ops.reshape(ops.arange(bsz, dtype="int32"), (-1, 1, 1, 1))
    lows, fracs = [], []
    for c in coords:
        f = ops.floor(c)
        lows.append(ops.cast(f, "int32"))
        fracs.append(c - f)
    out = inside = None
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                weight = None
                idx = []
                for axis, (lo, fr, n, step) in enumerate(
                    zip(lows, fracs, (d, h, w), (dz, dy, dx))
                ):
                    i = lo + step
                    valid = ops.logical_and(i >= 0, i < n)
                    wgt = fr if step else 1.0 - fr
                    wgt = ops.where(valid, wgt, ops.zeros_like(wgt))
                    weight = wgt if weight is None else weight * wgt
                    idx.append(ops.clip(i, 0, n - 1))
                vals = ops.take(flat, _flat_index(bidx, *idx, d, h, w), axis=0)
                term = ops.cast(vals, "float32") * weight[..., None]
                out = term if out is None else out + term
                inside = weight if inside is None else inside + weight
    return out, inside


def _sample_nearest(volume, coords, sizes, fill):
    """Nearest-neighbour sampling of ``[B, D, H, W, ...]``; ``fill`` outside the volume."""
    bsz, d, h, w = sizes
    trailing = ops.shape(volume)[4:]
    flat = ops.reshape(volume, (-1,) + tuple(trailing))
    bidx = ops.reshape(ops.arange(bsz, dtype="int32"), (-1, 1, 1, 1))
    valid = None
    idx = []
    for c, n in zip(coords, (d, h, w)):
        # floor(c + 0.5): ties go up, independent of the backend's round-half-to-even.
        i = ops.cast(ops.floor(c + 0.5), "int32")
        ok = ops.logical_and(i >= 0, i < n)
        valid = ok if valid is None else ops.logical_and(valid, ok)
        idx.append(ops.clip(i, 0, n - 1))
    vals = ops.take(flat, _flat_index(bidx, *idx, d, h, w), axis=0)
    for _ in trailing:
        valid = valid[..., None]
    return ops.where(valid, vals, ops.cast(fill, vals.dtype))


def _as_batched(image, labels):
    """Check ranks/shapes and add a batch axis to single volumes."""
    image = ops.convert_to_tensor(image)
    rank = len(image.shape)
    if rank not in (4, 5):
        raise InputError(
            "RandomAffine3D: 'image' must be [B, D, H, W, C] or [D, H, W, C], "
            f"got shape {tuple(image.shape)}"
        )
    batched = rank == 5
    if not batched:
        image = image[None]
    if labels is not None:
        labels = ops.convert_to_tensor(labels)
        lrank = len(labels.shape) + (0 if batched else 1)
        if lrank not in (4, 5) or (lrank == 5 and labels.shape[-1] not in (1, None)):
            raise InputError(
                "RandomAffine3D: 'labels' must be [B, D, H, W] or [B, D, H, W, 1] "
                f"(without B for a single volume), got shape {tuple(labels.shape)}"
            )
        if not batched:
            labels = labels[None]
        for a, (si, sl) in enumerate(zip(image.shape[:4], labels.shape[:4])):
            if si is not None and sl is not None and si != sl:
                raise InputError(
                    "RandomAffine3D: 'image' and 'labels' must share batch and spatial "
                    f"shape, got {tuple(image.shape)} and {tuple(labels.shape)}"
                )
    return image, labels, batched


def apply_affine_3d(image, labels, inverse_matrix, offset, interpolation="linear",
                    fill_value=0.0):
    """Resample a batch with given per-element sampling maps ``x_in = M x_out + b``.

    Args:
        image: float ``[B, D, H, W, C]`` (or ``[D, H, W, C]``).
        labels: integer ``[B, D, H, W]`` / ``[B, D, H, W, 1]`` (or unbatched), or ``None``.
        inverse_matrix: ``[B, 3, 3]`` M, mapping output voxel indices to input ones.
        offset: ``[B, 3]`` b, in voxels.
        interpolation: ``"linear"`` (trilinear) or ``"nearest"`` for the image; labels are
            always nearest.
        fill_value: image value outside the input: a number, ``[B, C]`` values (one per
            element and channel), or ``"minimum"`` (each element's own minimum per channel:
            the background of a z-scored scan, where 0 is the mean tissue intensity).

    Returns:
        ``(image, labels)`` resampled on the input grid (same shapes and dtypes); voxels
        mapped outside the input get ``fill_value`` (image) and 0 = background (labels).
    """
    if interpolation not in _INTERPOLATIONS:
        raise InputError(
            f"apply_affine_3d: argument 'interpolation' must be one of {_INTERPOLATIONS}, "
            f"got {interpolation!r}"
        )
    image, labels, batched = _as_batched(image, labels)
    shape = ops.shape(image)
    sizes = (shape[0], shape[1], shape[2], shape[3])
    inv = ops.cast(inverse_matrix, "float32")
    off = ops.cast(offset, "float32")
    coords = _sampling_coords(inv, off, *sizes[1:])
    fill = _fill(image, fill_value)
    if interpolation == "linear":
        # Corners outside the volume read fill: their share of the weight goes to it (zero
        # in the interior, so an identity map stays exact).
        values, inside = _sample_linear(image, coords, sizes)
        out = ops.cast(values + fill * (1.0 - inside[..., None]), image.dtype)
    else:
        out = _sample_nearest(image, coords, sizes, ops.cast(fill, image.dtype))
    out_labels = None if labels is None else _sample_nearest(labels, coords, sizes, 0)
    if not batched:
        out = out[0]
        out_labels = None if out_labels is None else out_labels[0]
    return out, out_labels


def _fill(image, fill_value):
    """``[B, 1, 1, 1, C]`` float32 fill values for a batched image."""
    if isinstance(fill_value, str):
        if fill_value != "minimum":
            raise InputError(f"RandomAffine3D: argument 'fill_value' must be a number, per-"
                             f"element values or 'minimum', got {fill_value!r}")
        return ops.min(ops.cast(image, "float32"), axis=(1, 2, 3), keepdims=True)
    fill = ops.cast(ops.convert_to_tensor(fill_value), "float32")
    if len(fill.shape) == 2:  # [B, C]
        fill = fill[:, None, None, None, :]
    return fill


def _check_fill(fill_value):
    if isinstance(fill_value, str):
        if fill_value != "minimum":
            raise InputError(f"RandomAffine3D: argument 'fill_value' must be a number or "
                             f"'minimum', got {fill_value!r}")
        return fill_value
    if isinstance(fill_value, bool) or not isinstance(fill_value, (int, float)) or not (
            math.isfinite(fill_value)):
        raise InputError(f"RandomAffine3D: argument 'fill_value' must be a finite number or "
                         f"'minimum', got {fill_value!r}")
    return float(fill_value)


def _draw_keys(seed, n):
    """Seeds for n independent draws.

    A ``SeedGenerator`` advances at each draw; an int gives n distinct stateless seeds (the
    same values at every call, as Keras treats int seeds); ``None`` uses Keras's global
    generator.
    """
    if isinstance(seed, keras.random.SeedGenerator) or seed is None:
        return [seed] * n
    if isinstance(seed, int) and not isinstance(seed, bool):
        return [(seed * n + k) & 0x7FFFFFFF for k in range(n)]
    raise InputError(
        "random_affine_3d: argument 'seed' must be an int, a keras.random.SeedGenerator "
        f"or None, got {seed!r}"
    )


def _random_transform(image, labels, seed, rot, axes, sh, zm, probability, interpolation,
                      fill_value="minimum"):
    """Draw per-element transforms and apply them (identity with probability 1 − p)."""
    image, labels, batched = _as_batched(image, labels)
    shape = ops.shape(image)
    bsz = shape[0]
    sizes = ops.convert_to_tensor([shape[1], shape[2], shape[3]], dtype="float32")

    keys = _draw_keys(seed, 4)
    apply = keras.random.uniform((bsz,), seed=keys[0]) < probability
    axis_mask = ops.convert_to_tensor([1.0 if a in axes else 0.0 for a in range(3)])
    deg = keras.random.uniform((bsz, 3), minval=rot[0], maxval=rot[1], seed=keys[1])
    angles = deg * (math.pi / 180.0) * axis_mask[None, :]
    frac = keras.random.uniform((bsz, 3), minval=sh[0], maxval=sh[1], seed=keys[2])
    zoom = keras.random.uniform((bsz,), minval=zm[0], maxval=zm[1], seed=keys[3])

    inv, off = _inverse_maps(angles, zoom, frac * sizes[None, :], sizes)
    # Elements left alone get the exact identity map (and their input back, below).
    eye = ops.eye(3, dtype="float32")[None]
    inv = ops.where(apply[:, None, None], inv, eye)
    off = ops.where(apply[:, None], off, ops.zeros_like(off))
    out, out_labels = apply_affine_3d(image, labels, inv, off, interpolation, fill_value)
    out = ops.where(ops.reshape(apply, (-1, 1, 1, 1, 1)), out, image)
    if out_labels is not None:
        keep = ops.reshape(apply, (-1,) + (1,) * (len(labels.shape) - 1))
        out_labels = ops.where(keep, out_labels, labels)
    if not batched:
        out = out[0]
        out_labels = None if out_labels is None else out_labels[0]
    return out, out_labels


def random_affine_3d(
    image,
    labels=None,
    seed: int | keras.random.SeedGenerator | None = None,
    rotation: float | Sequence[float] = 30.0,
    rotation_axes: int | Sequence[int] | str = (2,),
    shift: float | Sequence[float] = 0.2,
    zoom: float | Sequence[float] = (0.8, 1.2),
    probability: float = 0.8,
    interpolation: str = "linear",
    fill_value: float | str = "minimum",
):
    """Randomly rotate, shift and zoom image/label volumes, each element on its own.

    In a ``tf.data`` map, pass a ``keras.random.SeedGenerator`` (or use
    :class:`RandomAffine3D`): an int seed is stateless and gives every element the same
    draw.

    Args:
        image: float ``[B, D, H, W, C]`` (or ``[D, H, W, C]``).
        labels: integer ``[B, D, H, W]`` (or ``[B, D, H, W, 1]``, or unbatched) or ``None``.
        seed: int (stateless: the same transforms at every call),
            ``keras.random.SeedGenerator`` (advances at each call) or ``None`` (Keras's
            global generator).
        rotation: max |angle| in degrees, or a (low, high) range.
        rotation_axes: axes rotated about (0, 1, 2 or ``"all"``); default axis 2, which is
            the superior axis of canonical RAS volumes (rotation in the axial plane).
        shift: max |shift| as a fraction of each axis size, or a (low, high) range.
        zoom: (low, high) isotropic zoom range, or one number for a fixed zoom.
        probability: chance that an element is transformed (else returned unchanged).
        interpolation: ``"linear"`` or ``"nearest"`` for the image (labels: nearest).
        fill_value: image value where the transform reaches outside the volume: a number
            or ``"minimum"`` (each volume's minimum per channel, i.e. its background).

    Returns:
        ``(image, labels)`` with the input shapes and dtypes (``labels`` is ``None`` when
        none was given).
    """
    args = _check_args(rotation, rotation_axes, shift, zoom, probability, interpolation)
    _draw_keys(seed, 1)  # validates the seed before any work
    return _random_transform(image, labels, seed, *args, interpolation, _check_fill(fill_value))


@keras.saving.register_keras_serializable(package="tf_explog")
class RandomAffine3D(keras.layers.Layer):
    """Random rotation/shift/zoom of ``(image, labels)`` batches, active in training only.

    Each batch element gets its own transform (with probability ``probability``, else the
    identity); the image is resampled trilinearly (or nearest), the labels nearest, with the
    same transform about the volume centre; outside the volume the image gets
    ``fill_value`` (by default each volume's minimum: its background, not the z-scored
    mean 0) and the labels background. See the module docstring for the conventions.

    Call as ``image, labels = layer((image, labels), training=True)`` or ``image =
    layer(image)``; shapes: image ``[B, D, H, W, C]``, labels ``[B, D, H, W]`` (single
    volumes without B also work, e.g. inside ``tf.data.Dataset.map`` before batching).

    Args:
        rotation: max |angle| in degrees (or a (low, high) range); paper's author: 30.
        rotation_axes: axes rotated about: a subset of (0, 1, 2) or ``"all"``; default
            ``(2,)``, one axis as the paper's author's code (the superior axis of RAS data).
        shift: max |shift| as a fraction of the axis size (or a (low, high) range).
        zoom: (low, high) isotropic zoom range.
        probability: chance that an element is transformed.
        seed: int or ``None``; drives a ``keras.random.SeedGenerator``.
        interpolation: ``"linear"`` or ``"nearest"`` for the image.
        fill_value: ``"minimum"`` (default) or a number, see above.
    """

    def __init__(
        self,
        rotation: float | Sequence[float] = 30.0,
        rotation_axes: int | Sequence[int] | str = (2,),
        shift: float | Sequence[float] = 0.2,
        zoom: float | Sequence[float] = (0.8, 1.2),
        probability: float = 0.8,
        seed: int | None = None,
        interpolation: str = "linear",
        fill_value: float | str = "minimum",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self._args = _check_args(rotation, rotation_axes, shift, zoom, probability,
                                 interpolation)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InputError(f"RandomAffine3D: argument 'seed' must be an int or None, "
                             f"got {seed!r}")
        self.rotation = rotation if isinstance(rotation, (int, float)) else list(rotation)
        self.rotation_axes = list(self._args[1])
        self.shift = shift if isinstance(shift, (int, float)) else list(shift)
        self.zoom = zoom if isinstance(zoom, (int, float)) else list(zoom)
        self.probability = float(probability)
        self.seed = seed
        self.interpolation = interpolation
        self.fill_value = _check_fill(fill_value)
        self.seed_generator = keras.random.SeedGenerator(seed)
        # Geometry is computed in float32 whatever the policy; labels must stay integer.
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True
        self.supports_masking = False

    def call(self, inputs, training=True):
        paired = isinstance(inputs, (tuple, list))
        if paired:
            if len(inputs) != 2:
                raise InputError(
                    f"RandomAffine3D: inputs must be image or (image, labels), got a "
                    f"sequence of {len(inputs)}"
                )
            image, labels = inputs
        else:
            image, labels = inputs, None
        if not training:
            return (image, labels) if paired else image
        out, out_labels = _random_transform(
            image, labels, self.seed_generator, *self._args, self.interpolation,
            self.fill_value
        )
        return (out, out_labels) if paired else out

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "rotation": self.rotation,
                "rotation_axes": self.rotation_axes,
                "shift": self.shift,
                "zoom": self.zoom,
                "probability": self.probability,
                "seed": self.seed,
                "interpolation": self.interpolation,
                "fill_value": self.fill_value,
            }
        )
        return config
