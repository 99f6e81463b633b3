"""OOD sets: pure transforms of integer-level images that a model trained on a data set has never seen.

Each set keeps the batch's shape, dtype and levels: uniform noise, Gaussian blur, contrast inversion L-1-x,
horizontal flip, and another data set resampled to this one's shape and levels (resample_images: digits 8x8 at
17 levels <-> Fashion-MNIST 28x28 at 256 levels). Vector data (digits: (N, 64)) is viewed as images through
`image_shape` ((1, 8, 8) by default for a square vector) and returned as vectors. eval.ood scores a model on
them (AUROC / AUPR of telling them from the test set).

They are data transforms, not scores, hence a module of their own: nothing here knows a model.

Example:
    >>> import torch
    >>> x = torch.tensor([[0, 3, 16, 8]], dtype=torch.uint8)  # one 2x2 "image" at 17 levels, as a vector
    >>> invert_contrast(x, 17).tolist(), hflip(x).tolist()
    ([[16, 13, 0, 8]], [[3, 0, 8, 16]])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..data import Splits

__all__ = ["check_levels", "random_subset", "uniform_noise", "gaussian_blur", "invert_contrast", "hflip",
           "resample_images", "other_dataset", "standard_ood_sets"]


def check_levels(x: Tensor, levels: int, what: str = "x") -> None:
    """Raise ValueError unless x is a non-empty batch tensor (N, ...) of integer levels in [0, levels - 1]."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an int >= 2, got {levels!r}")
    if x.dim() < 2 or len(x) == 0:
        raise ValueError(f"{what} must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    xf = x.double()
    if not torch.isfinite(xf).all() or (xf != torch.round(xf)).any() or xf.min() < 0 or xf.max() > levels - 1:
        raise ValueError(f"{what} must hold integer levels in [0, {levels - 1}], got range "
                         f"[{float(xf.min()):.4g}, {float(xf.max()):.4g}]")


def random_subset(x: Tensor, n: int | None, seed: int, what: str = "n") -> Tensor:
    """At most n rows of x, a seeded random subset (numpy.random.default_rng(seed)) in the original order.

    n None (or >= len(x)): x itself. `what` names n in the error message.

    Example:
        >>> import torch
        >>> x = torch.arange(10)
        >>> s = random_subset(x, 3, seed=0)
        >>> len(s), bool((s[1:] > s[:-1]).all()), torch.equal(s, random_subset(x, 3, seed=0))  # sorted, seeded
        (3, True, True)
        >>> random_subset(x, None, seed=0) is x
        True
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"{what} must be an int >= 1 (or None: all), got {n!r}")
    if n is None or n >= len(x):
        return x
    keep = np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))
    return x[torch.from_numpy(keep)]


def _image_shape(sample_shape: tuple[int, ...], image_shape: Sequence[int] | None) -> tuple[int, int, int]:
    """(C, H, W) of one sample: image_shape as given ((H, W) or (C, H, W)), else the sample's own (C, H, W) /
    (H, W) shape, else a square vector as (1, side, side) (digits: 64 -> (1, 8, 8))."""
    n = math.prod(sample_shape)
    if image_shape is None:
        if len(sample_shape) in (2, 3):
            image_shape = sample_shape
        else:
            side = math.isqrt(n)
            if len(sample_shape) != 1 or side * side != n:
                raise ValueError(f"cannot view samples of shape {tuple(sample_shape)} as images; pass image_shape")
            image_shape = (side, side)
    shape = tuple(int(s) for s in image_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or math.prod(shape) != n:
        raise ValueError(f"image_shape {tuple(image_shape)} does not fit samples of shape {tuple(sample_shape)} "
                         f"({n} values); give (H, W) or (C, H, W)")
    return shape  # type: ignore[return-value]


def uniform_noise(x: Tensor, levels: int, seed: int = 0) -> Tensor:
    """Uniform integer noise over the levels 0..L-1, of x's shape and dtype (x's values are not used).

    Args:
        x: (N, ...) a batch whose shape and dtype the noise takes.
        levels: L.
        seed: seeds a torch.Generator (the global generator is untouched).

    Returns:
        (N, ...) i.i.d. uniform levels.
    """
    check_levels(x, levels)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, tuple(x.shape), generator=gen).to(x.dtype)


def gaussian_blur(x: Tensor, levels: int, sigma: float = 1.0, image_shape: Sequence[int] | None = None) -> Tensor:
    """Gaussian-blurred images, re-quantised: round(blur(x)) in 0..L-1, x's shape and dtype.

    torchvision.transforms.functional.gaussian_blur with reflect padding, kernel 2 ceil(3 sigma) + 1 (at most
    2 min(H, W) - 1, as reflect padding needs), on each channel of the (C, H, W) view of a sample.

    Args:
        x: (N, ...) integer levels.
        levels: L.
        sigma: the blur's standard deviation in pixels (> 0).
        image_shape: the image view of a sample ((H, W) or (C, H, W)); None: see the module docstring.

    Returns:
        (N, ...) blurred levels.
    """
    from torchvision.transforms.functional import gaussian_blur as tv_blur

    check_levels(x, levels)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
    c, h, w = _image_shape(tuple(x.shape[1:]), image_shape)
    k = min(2 * math.ceil(3 * sigma) + 1, 2 * min(h, w) - 1)
    img = x.reshape(len(x), c, h, w).double()
    blurred = tv_blur(img, kernel_size=[k, k], sigma=[float(sigma), float(sigma)])
    return blurred.round().clamp(0, levels - 1).reshape(x.shape).to(x.dtype)


def invert_contrast(x: Tensor, levels: int) -> Tensor:
    """L - 1 - x (black <-> white), x's shape and dtype; an involution."""
    check_levels(x, levels)
    return ((levels - 1) - x.to(torch.int64)).to(x.dtype)


def hflip(x: Tensor, image_shape: Sequence[int] | None = None) -> Tensor:
    """Images mirrored left-right (the W axis of the (C, H, W) view), x's shape and dtype; an involution."""
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a batch tensor (N, ...), got {getattr(x, 'shape', type(x).__name__)}")
    c, h, w = _image_shape(tuple(x.shape[1:]), image_shape)
    return x.reshape(len(x), c, h, w).flip(-1).reshape(x.shape)


def resample_images(
    x: Tensor, from_shape: Sequence[int], from_levels: int, to_shape: Sequence[int], to_levels: int,
) -> Tensor:
    """Images of one data set as another's: bilinear resize, then levels rescaled and rounded.

    v in 0..L_from-1 -> v / (L_from - 1) -> bilinear resize (torch.nn.functional.interpolate, align_corners
    False, antialiased when shrinking) -> round(. * (L_to - 1)). A constant image stays constant (up to the
    rounding). Channels: 1 -> C repeats the grey image, C -> 1 averages the channels.

    Args:
        x: (N, ...) integer levels 0..from_levels-1, N samples of prod(from_shape) values each.
        from_shape: a sample's shape, (C, H, W), (H, W) or a square vector (digits: (64,) = 1x8x8).
        from_levels: L_from.
        to_shape: the output sample shape, read the same way (Fashion-MNIST: (1, 28, 28)).
        to_levels: L_to.

    Returns:
        (N, *to_shape) in x's dtype, levels 0..to_levels-1.

    Example:
        >>> import torch
        >>> digits = torch.full((2, 64), 16, dtype=torch.uint8)  # white 8x8 digits at 17 levels
        >>> y = resample_images(digits, (64,), 17, (1, 28, 28), 256)
        >>> tuple(y.shape), y.dtype, int(y.min()), int(y.max())
        ((2, 1, 28, 28), torch.uint8, 255, 255)
    """
    check_levels(x, from_levels)
    if isinstance(to_levels, bool) or not isinstance(to_levels, int) or to_levels < 2:
        raise ValueError(f"to_levels must be an int >= 2, got {to_levels!r}")
    from_shape, to_shape = tuple(from_shape), tuple(to_shape)
    if x[0].numel() != math.prod(from_shape):
        raise ValueError(f"x has samples of shape {tuple(x.shape[1:])} ({x[0].numel()} values), "
                         f"from_shape {from_shape} has {math.prod(from_shape)}")
    if not x.dtype.is_floating_point and torch.iinfo(x.dtype).max < to_levels - 1:
        raise ValueError(f"{x.dtype} cannot hold level {to_levels - 1}; cast x first")
    c0, h0, w0 = _image_shape(from_shape, None)
    c1, h1, w1 = _image_shape(to_shape, None)
    img = x.reshape(len(x), c0, h0, w0).double() / (from_levels - 1)
    if c0 != c1:
        if c0 == 1:
            img = img.expand(-1, c1, -1, -1)
        elif c1 == 1:
            img = img.mean(1, keepdim=True)
        else:
            raise ValueError(f"cannot map {c0} channels to {c1}; only 1 <-> C")
    shrink = h1 < h0 or w1 < w0
    img = torch.nn.functional.interpolate(img, size=(h1, w1), mode="bilinear", align_corners=False, antialias=shrink)
    out = (img.clamp(0, 1) * (to_levels - 1)).round()
    return out.reshape(len(x), *to_shape).to(x.dtype)


def other_dataset(
    source: Splits | Tensor, target: Splits, *, from_shape: Sequence[int] | None = None,
    from_levels: int | None = None, n: int | None = None, seed: int = 0,
) -> Tensor:
    """Another data set's images as an OOD set of `target`: resampled to target's sample shape and levels.

    Args:
        source: the other data set, a Splits (its test images, data_shape and levels are used) or a tensor
            (N, ...) of integer levels (then from_shape and from_levels are required). Loading it (e.g.
            Fashion-MNIST with data.load_data) is the caller's job.
        target: the in-distribution Splits (its data_shape and levels).
        from_shape, from_levels: the tensor source's sample shape and levels.
        n: keep at most this many images (a seeded random subset, in their original order); None: all.
        seed: the subset's seed.

    Returns:
        (n, *target.data_shape) integer levels in the source tensor's dtype (resample_images).
    """
    if isinstance(source, Splits):
        if source.levels is None:
            raise ValueError("the other data set must be quantised (levels not None)")
        x, from_shape, from_levels = source.test.tensors[0], source.data_shape, source.levels
    elif isinstance(source, Tensor):
        if from_shape is None or from_levels is None:
            raise ValueError("a tensor source needs from_shape and from_levels")
        x = source
    else:
        raise ValueError(f"source must be a Splits or a tensor, got {type(source).__name__}")
    if target.levels is None:
        raise ValueError("the in-distribution data must be quantised (levels not None)")
    x = random_subset(x, n, seed)
    return resample_images(x, from_shape, from_levels, target.data_shape, target.levels)


def standard_ood_sets(
    data: Splits, image_shape: Sequence[int] | None = None, seed: int = 0, sigma: float = 1.0, n: int | None = None,
) -> dict[str, Tensor]:
    """The offline OOD sets of a Splits' test images: {"uniform noise", "blurred", "inverted", "flipped"}.

    Each is a pure transform of data.test's images (uniform_noise with `seed`, gaussian_blur with `sigma`,
    invert_contrast, hflip), same shape, dtype and levels. Add another data set with other_dataset.
    n: transform at most this many test images (a seeded random subset in their original order; None: all),
    so that scoring the sets costs n images each, not the whole test set each.
    """
    if data.levels is None:
        raise ValueError("OOD transforms need quantised data (levels not None)")
    x = random_subset(data.test.tensors[0], n, seed)
    return {"uniform noise": uniform_noise(x, data.levels, seed),
            "blurred": gaussian_blur(x, data.levels, sigma, image_shape),
            "inverted": invert_contrast(x, data.levels),
            "flipped": hflip(x, image_shape)}
