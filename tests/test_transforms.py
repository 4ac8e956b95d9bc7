"""The paper's preprocessing: downsampling, standardisation, crops, training augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustcaps.data import transforms
from robustcaps.errors import RobustcapsError


def test_downsample_is_2x2_mean_oracle():
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, 256, (3, 2, 96, 96), dtype=np.uint8)
    out = transforms.downsample(pairs, 48)
    assert out.dtype == torch.float32 and out.shape == (3, 2, 48, 48)
    oracle = pairs.astype(np.float64).reshape(3, 2, 48, 2, 48, 2).mean(axis=(3, 5)) / 255.0
    np.testing.assert_allclose(out.numpy(), oracle, atol=1e-6)


def test_downsample_non_integer_factor_keeps_mean():
    x = torch.rand(2, 1, 50, 50)
    out = transforms.downsample(x, 48)
    assert out.shape == (2, 1, 48, 48)
    np.testing.assert_allclose(out.mean().item(), x.mean().item(), atol=0.01)


def test_standardize_zero_mean_unit_variance_and_constant_images():
    x = torch.rand(4, 2, 48, 48) * 7 + 3
    x[2] = 0.5  # constant image: must not become NaN
    z = transforms.standardize(x)
    flat = z.reshape(4, -1)
    for i in (0, 1, 3):
        assert abs(flat[i].mean().item()) < 1e-5
        assert abs(flat[i].std(unbiased=False).item() - 1) < 1e-4
    assert torch.all(z[2] == 0)
    # Per image, over both stereo channels jointly: channels keep their relative offset.
    a = torch.zeros(1, 2, 4, 4)
    a[0, 1] = 1.0
    za = transforms.standardize(a)
    assert torch.allclose(za[0, 0], torch.full((4, 4), -1.0)) and torch.allclose(za[0, 1], torch.ones(4, 4))


def test_standardize_floor_matches_tf_per_image_standardization():
    # Nearly-constant image: std 1e-6 < 1/sqrt(n), so the floor 1/sqrt(n) is used.
    x = torch.full((1, 1, 4, 4), 2.0)
    x[0, 0, 0, 0] += 1.6e-5
    z = transforms.standardize(x)
    expected = (x - x.mean()) / (1 / 4.0)
    assert torch.allclose(z, expected, atol=1e-7)


def test_preprocess_norb_chunked_equals_one_shot_and_mono():
    rng = np.random.default_rng(1)
    pairs = rng.integers(0, 256, (7, 2, 96, 96), dtype=np.uint8)
    seen = []
    chunked = transforms.preprocess_norb(pairs, chunk=3, progress=seen.append)
    whole = transforms.standardize(transforms.downsample(pairs))
    assert seen == [3, 3, 1]
    assert torch.equal(chunked, whole)
    mono = transforms.preprocess_norb(pairs, stereo=False)
    assert mono.shape == (7, 1, 48, 48)
    assert torch.allclose(mono, transforms.standardize(transforms.downsample(pairs[:, :1])))
    cropped = transforms.preprocess_norb(pairs, crop=32)
    assert torch.equal(cropped, whole[..., 8:40, 8:40])


def test_center_and_multi_crop():
    x = torch.arange(2 * 1 * 48 * 48, dtype=torch.float32).reshape(2, 1, 48, 48)
    c = transforms.center_crop(x, 32)
    assert torch.equal(c, x[..., 8:40, 8:40])
    m = transforms.multi_crop(x, 32)
    assert m.shape == (2, 5, 1, 32, 32)
    assert torch.equal(m[:, 0], c)
    assert torch.equal(m[:, 1], x[..., :32, :32]) and torch.equal(m[:, 4], x[..., 16:, 16:])
    g = transforms.multi_crop(x, 32, grid=3)
    assert g.shape == (2, 9, 1, 32, 32)
    assert torch.equal(g[:, 4], c)  # middle of a 3x3 grid is the centre
    with pytest.raises(RobustcapsError, match="crop size 64 larger"):
        transforms.center_crop(x, 64)


def test_multi_crop_scores_averages_activations():
    x = torch.randn(3, 2, 48, 48)
    w = torch.randn(2 * 32 * 32, 4)

    def score_fn(v):
        return v.reshape(v.shape[0], -1) @ w

    out = transforms.multi_crop_scores(score_fn, x)
    crops = transforms.multi_crop(x)
    oracle = torch.stack([torch.sigmoid(score_fn(crops[:, k])) for k in range(5)]).mean(0)
    assert out.shape == (3, 4)
    assert torch.allclose(out, oracle, atol=1e-5)


def test_train_augment_shapes_ranges_and_reproducibility():
    torch.manual_seed(0)
    x = transforms.standardize(torch.rand(64, 2, 48, 48))
    a = transforms.train_augment(x, torch.Generator().manual_seed(3))
    b = transforms.train_augment(x, torch.Generator().manual_seed(3))
    c = transforms.train_augment(x, torch.Generator().manual_seed(4))
    assert a.shape == (64, 2, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)

    # Each output is an affine map (contrast c, brightness b) of some 32x32 crop of its input,
    # with the same crop, c and b for both channels: recover them and check the ranges.
    for i in range(64):
        found = False
        for t in range(17):
            for s in range(17):
                crop = x[i, :, t:t + 32, s:s + 32]
                m = crop.mean()
                dc = (crop - m).reshape(-1)
                da = (a[i] - m).reshape(-1)
                cfac = (dc @ da) / (dc @ dc)
                bshift = (a[i] - ((crop - m) * cfac + m)).mean()
                if torch.allclose(a[i], (crop - m) * cfac + m + bshift, atol=1e-4):
                    assert 0.5 - 1e-4 <= cfac <= 1.5 + 1e-4
                    assert abs(bshift) <= 0.5 + 1e-4
                    found = True
                    break
            if found:
                break
        assert found, f"sample {i} is not an affine image of any crop"


def test_train_augment_no_jitter_is_a_crop():
    x = torch.randn(5, 1, 48, 48)
    out = transforms.train_augment(x, torch.Generator().manual_seed(0), brightness=0.0,
                                   contrast=(1.0, 1.0))
    crops = transforms.multi_crop(x, 32, grid=17)  # every possible offset
    for i in range(5):
        assert any(torch.allclose(out[i], crops[i, k], atol=1e-6) for k in range(crops.shape[1]))


def test_train_augment_on_cuda_when_available():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    x = torch.randn(4, 2, 48, 48, device="cuda")
    cpu = transforms.train_augment(x.cpu(), torch.Generator().manual_seed(1))
    gpu = transforms.train_augment(x, torch.Generator().manual_seed(1))
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-5)
