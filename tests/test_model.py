"""The CNN adapts to the data's channels, size and classes."""

from __future__ import annotations

import pytest
import torch

from imgpipe.model import ConvNet


@pytest.mark.parametrize(
    ("channels", "height", "width", "classes"),
    [(1, 8, 8, 10), (3, 10, 12, 3), (1, 28, 28, 10), (3, 224, 224, 2), (1, 1, 1, 2)],
)
def test_output_shape_follows_the_data(
    channels: int, height: int, width: int, classes: int
) -> None:
    model = ConvNet(channels, height, width, classes).eval()
    out = model(torch.zeros(5, channels, height, width))
    assert out.shape == (5, classes)
    # log-probabilities: each row sums to one after exp
    torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(5))


def test_large_images_do_not_blow_up_the_parameter_count() -> None:
    small = sum(p.numel() for p in ConvNet(3, 32, 32, 10).parameters())
    large = sum(p.numel() for p in ConvNet(3, 512, 512, 10).parameters())
    assert large == small  # adaptive pooling caps fc1's input


def test_a_single_class_is_refused() -> None:
    with pytest.raises(ValueError, match="two classes"):
        ConvNet(1, 8, 8, 1)
