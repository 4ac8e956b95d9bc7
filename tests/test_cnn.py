"""The baseline CNN of Section 5."""

from __future__ import annotations

import pytest
import torch

from robustcaps.errors import RobustcapsError
from robustcaps.models.cnn import BaselineCNN
from robustcaps.models.registry import architectures, count_params, create_model


def test_param_count_matches_paper():
    model = create_model("cnn")
    n = count_params(model)
    # conv 2*32*25+32, conv 32*64*25+64, fc 64*8*8*1024+1024, fc 1024*5+5
    assert n == (2 * 32 * 25 + 32) + (32 * 64 * 25 + 64) + (4096 * 1024 + 1024) + (1024 * 5 + 5)
    assert n == 4_253_349
    assert abs(n - 4.2e6) / 4.2e6 < 0.03


def test_shapes_and_registry():
    arch = architectures()["cnn"]
    assert arch.outputs == "logits" and arch.input_shape == (2, 32, 32)
    model = create_model("cnn").eval()
    assert model(torch.randn(3, 2, 32, 32)).shape == (3, 5)
    mnist = create_model("cnn", num_classes=10, input_shape=(1, 28, 28)).eval()
    assert mnist(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    assert count_params(mnist) == (1 * 32 * 25 + 32) + (32 * 64 * 25 + 64) + (
        64 * 7 * 7 * 1024 + 1024) + (1024 * 10 + 10)


def test_eval_is_deterministic_and_dropout_active_in_train():
    torch.manual_seed(0)
    model = BaselineCNN()
    x = torch.randn(2, 2, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


def test_bad_image_size():
    with pytest.raises(RobustcapsError, match="divisible by 4"):
        BaselineCNN(image_size=(30, 30))
