"""The paper's smallNORB preprocessing (Hinton et al. 2018, Section 5).

"We downsample smallNORB to 48 x 48 pixels and normalize each image to have zero mean and unit
variance. During training, we randomly crop 32 x 32 patches and add random brightness and
contrast to the cropped images. During test, we crop a 32 x 32 patch from the center of the
image [...] average the class activations over multiple crops at test time."

Conventions used here (the paper leaves them open):

- Downsampling 96 -> 48 is 2x2 area averaging (exact for the factor 2).
- A stereo pair is one image with two channels: standardisation, crop offsets, brightness and
  contrast are shared by both channels (same scene, same lighting, same geometry). The std is
  floored at ``1/sqrt(C*H*W)`` (as TensorFlow's ``per_image_standardization``), so a constant
  image becomes all zeros instead of NaN.
- Brightness and contrast act in the standardised space: ``x' = (x - m) * c + m + b`` with
  ``m`` the per-image mean, ``c ~ U(contrast)`` and ``b ~ U(-brightness, brightness)``.
- Multi-crop testing uses the centre and the four corners (five crops) unless a grid is asked.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import RobustcapsError


def downsample(x: torch.Tensor | np.ndarray, size: int = 48) -> torch.Tensor:
    """Area-resize (N, C, H, W) images (uint8 or float) to float32 (N, C, size, size).

    uint8 input is scaled to [0, 1] first.
    """
    if isinstance(x, np.ndarray):
        # memmap slices are read-only; torch wants writable memory (then one chunk is copied).
        x = np.array(x, copy=not x.flags.writeable or not x.flags.c_contiguous)
        t = torch.from_numpy(x)
    else:
        t = x
    if t.dim() != 4:
        raise RobustcapsError(f"downsample expects (N, C, H, W), got shape {tuple(t.shape)}")
    scale = 1.0 / 255.0 if t.dtype == torch.uint8 else None
    t = t.float()
    h, w = t.shape[-2:]
    if (h, w) == (size, size):
        out = t.contiguous() if scale is None else t * scale
    elif h % size == 0 and w % size == 0:
        out = F.avg_pool2d(t, kernel_size=(h // size, w // size))
    else:
        out = F.adaptive_avg_pool2d(t, (size, size))
    if scale is not None and (h, w) != (size, size):
        out.mul_(scale)  # after pooling: 4x fewer multiplications
    return out


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Per-image zero mean, unit variance over all of an image's (C, H, W) values.

    (N, C, H, W) float -> same shape float32. std is floored at 1/sqrt(C*H*W).
    """
    if x.dim() != 4:
        raise RobustcapsError(f"standardize expects (N, C, H, W), got shape {tuple(x.shape)}")
    x = x.float()
    flat = x.reshape(x.shape[0], -1)
    std, mean = torch.std_mean(flat, dim=1, correction=0, keepdim=True)
    floor = 1.0 / float(np.sqrt(max(1, flat.shape[1])))
    return ((flat - mean) / std.clamp_min(floor)).reshape(x.shape)


def preprocess_norb(
    pairs: np.ndarray,
    *,
    stereo: bool = True,
    size: int = 48,
    crop: int | None = None,
    chunk: int = 1024,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """uint8 (N, 2, 96, 96) pairs (array or memmap) -> float32 (N, C, S, S) standardised.

    S = ``size``, or ``crop`` when given (centre crop of the standardised ``size`` image).
    ``stereo=False`` keeps only the first (left) camera image, C = 1. Works through the input
    ``chunk`` rows at a time so peak memory is the output plus one chunk. ``progress(n)`` is
    called with the number of rows done after each chunk.
    """
    pairs_shape = tuple(pairs.shape)
    if len(pairs_shape) != 4:
        raise RobustcapsError(f"expected (N, 2, H, W) image pairs, got shape {pairs_shape}")
    n = pairs_shape[0]
    c = pairs_shape[1] if stereo else 1
    side = crop if crop is not None else size
    out = torch.empty((n, c, side, side), dtype=torch.float32)
    for start in range(0, n, chunk):
        block = np.asarray(pairs[start:start + chunk])
        if not stereo:
            block = block[:, :1]
        img = standardize(downsample(block, size))
        out[start:start + len(block)] = center_crop(img, crop) if crop is not None else img
        if progress is not None:
            progress(len(block))
    return out


def center_crop(x: torch.Tensor, size: int = 32) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size), the centre patch (offset (H - size) // 2)."""
    h, w = x.shape[-2:]
    if size > h or size > w:
        raise RobustcapsError(f"crop size {size} larger than images of {h}x{w}")
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def crop_offsets(h: int, w: int, size: int = 32, grid: int | None = None) -> list[tuple[int, int]]:
    """(top, left) offsets of the multi-crop patches.

    ``grid=None``: centre + four corners (5 crops). ``grid=k``: k x k evenly spaced crops.
    """
    if size > h or size > w:
        raise RobustcapsError(f"crop size {size} larger than images of {h}x{w}")
    if grid is None:
        return [((h - size) // 2, (w - size) // 2), (0, 0), (0, w - size), (h - size, 0),
                (h - size, w - size)]
    if grid < 1:
        raise RobustcapsError(f"multi-crop grid must be >= 1, got {grid}")
    tops = np.linspace(0, h - size, grid).round().astype(int) if grid > 1 else [(h - size) // 2]
    lefts = np.linspace(0, w - size, grid).round().astype(int) if grid > 1 else [(w - size) // 2]
    return [(int(t), int(left)) for t in tops for left in lefts]


def multi_crop(x: torch.Tensor, size: int = 32, grid: int | None = None) -> torch.Tensor:
    """(N, C, H, W) -> (N, n_crops, C, size, size); crops as in :func:`crop_offsets`."""
    if x.dim() != 4:
        raise RobustcapsError(f"multi_crop expects (N, C, H, W), got shape {tuple(x.shape)}")
    offsets = crop_offsets(x.shape[-2], x.shape[-1], size, grid)
    return torch.stack([x[..., t:t + size, left:left + size] for t, left in offsets], dim=1)


def multi_crop_scores(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    size: int = 32,
    grid: int | None = None,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = torch.sigmoid,
) -> torch.Tensor:
    """Multi-crop test-time prediction: mean over crops of ``activation(score_fn(crop))``.

    x: (N, C, H, W) uncropped (e.g. 48x48) images; score_fn maps (M, C, size, size) -> (M, K).
    The paper averages class *activations*, hence the default sigmoid for capsule logits
    (pass ``activation=None`` to average raw scores). Returns (N, K).
    """
    crops = multi_crop(x, size, grid)
    n, k = crops.shape[:2]
    scores = score_fn(crops.reshape(n * k, *crops.shape[2:]))
    if activation is not None:
        scores = activation(scores)
    return scores.reshape(n, k, -1).mean(dim=1)


def train_augment(
    x48: torch.Tensor,
    generator: torch.Generator,
    size: int = 32,
    brightness: float = 0.5,
    contrast: tuple[float, float] = (0.5, 1.5),
) -> torch.Tensor:
    """Random crop + random brightness and contrast: (N, C, H, W) -> (N, C, size, size).

    One crop offset, brightness shift and contrast factor per sample, shared by its channels.
    Random numbers come from ``generator`` (on the CPU) so a run is reproducible; the result
    is on ``x48``'s device.
    """
    if x48.dim() != 4:
        raise RobustcapsError(f"train_augment expects (N, C, H, W), got shape {tuple(x48.shape)}")
    n, c, h, w = x48.shape
    if size > h or size > w:
        raise RobustcapsError(f"crop size {size} larger than images of {h}x{w}")
    lo, hi = contrast
    if not 0 <= lo <= hi or brightness < 0:
        raise RobustcapsError(f"invalid augmentation ranges: brightness={brightness}, contrast={contrast}")
    gen_device = generator.device
    tops = torch.randint(0, h - size + 1, (n,), generator=generator, device=gen_device).to(x48.device)
    lefts = torch.randint(0, w - size + 1, (n,), generator=generator, device=gen_device).to(x48.device)
    u = torch.rand((n, 2), generator=generator, device=gen_device).to(x48.device, torch.float32)
    b = (u[:, 0] * 2 - 1) * brightness
    cfac = lo + u[:, 1] * (hi - lo)
    # Gather the crops with one advanced-indexing op (no Python loop over samples).
    ar = torch.arange(size, device=x48.device)
    rows = (tops[:, None] + ar[None, :])[:, None, :, None]  # (N, 1, size, 1)
    cols = (lefts[:, None] + ar[None, :])[:, None, None, :]  # (N, 1, 1, size)
    idx_n = torch.arange(n, device=x48.device)[:, None, None, None]
    idx_c = torch.arange(c, device=x48.device)[None, :, None, None]
    crops = x48[idx_n, idx_c, rows, cols].float()
    mean = crops.mean(dim=(1, 2, 3), keepdim=True)
    return (crops - mean) * cfac[:, None, None, None] + mean + b[:, None, None, None]
