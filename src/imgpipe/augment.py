"""Augmentation of training batches: per image, on the training device, seeded, resumable.

``augment=none`` (the default) does nothing and draws nothing. ``basic`` is a random
resized crop (``augment_crop_scale``, aspect 3/4..4/3) and a horizontal flip
(``augment_flip``); ``strong`` adds colour jitter (``augment_jitter``: brightness,
contrast, saturation) and random erasing (``augment_erase``). Any setting left null takes
its preset's value.

It works on the batches the engine already gathers (in memory or streamed), as one
vectorised pass over the whole batch with a different draw per image: the crop and flip
are one ``affine_grid``/``grid_sample`` (bilinear), so they commute with the per-channel
normalisation already applied; the colour steps go back to [0, 1] pixels for their
arithmetic; erasing fills with the mean (0 after normalisation). torchvision's v2
transforms draw one set of parameters per batch (pytorch/vision#8484), hence this.

Randomness comes from the ``Augmenter``'s own generator on the device, seeded from the
run's seed and the process's rank (each DDP rank draws its own), and advanced by a fixed
number of draws per batch whatever the settings; its state goes into the checkpoint, so
a resumed run continues the same draws. Evaluation never augments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

RATIO = (3 / 4, 4 / 3)  # a crop's aspect ratio range (torchvision's default)
ERASE_AREA = (0.02, 0.33)  # the erased share of the image (torchvision's RandomErasing)
ERASE_RATIO = (0.3, 3.3)
DRAWS = 13  # uniform numbers drawn per image and batch, whatever the settings


@dataclass(frozen=True)
class AugmentSettings:
    crop_scale: tuple[float, float] | None  # share of the area kept; None: no crop
    flip: float  # probability of a horizontal flip
    jitter: float  # brightness/contrast/saturation: factors in [1 - jitter, 1 + jitter]
    erase: float  # probability of erasing one rectangle

    @property
    def active(self) -> bool:
        return self.crop_scale is not None or self.flip > 0 or self.jitter > 0 or self.erase > 0


PRESETS = {
    "none": AugmentSettings(crop_scale=None, flip=0.0, jitter=0.0, erase=0.0),
    "basic": AugmentSettings(crop_scale=(0.35, 1.0), flip=0.5, jitter=0.0, erase=0.0),
    "strong": AugmentSettings(crop_scale=(0.2, 1.0), flip=0.5, jitter=0.4, erase=0.25),
}


def settings(
    preset: str,
    *,
    crop_scale: list[float] | tuple[float, float] | None = None,
    flip: float | None = None,
    jitter: float | None = None,
    erase: float | None = None,
) -> AugmentSettings:
    """The preset's settings with the non-null overrides in."""
    base = PRESETS[preset]
    changes: dict = {}
    if crop_scale is not None:
        changes["crop_scale"] = (float(crop_scale[0]), float(crop_scale[1]))
    for key, value in (("flip", flip), ("jitter", jitter), ("erase", erase)):
        if value is not None:
            changes[key] = float(value)
    return replace(base, **changes)


def augment_seed(seed: int, rank: int) -> int:
    """The augmenter's seed: apart from the batch order's and torch's (same ``seed``), and
    another for every rank."""
    return (seed * 1_000_003 + 7_919 * (rank + 1) + 0x5EED) % (2**63)


class Augmenter:
    """Applies ``settings`` to batches normalised with ``mean``/``std``; call it on a
    batch (N, C, H, W) of float32 on ``device``."""

    def __init__(
        self,
        settings: AugmentSettings,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
        seed: int,
        rank: int = 0,
    ) -> None:
        self.settings = settings
        self.device = device
        shape = (1, len(mean), 1, 1)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(shape)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(shape)
        self.generator = torch.Generator(device=device).manual_seed(augment_seed(seed, rank))

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self.settings
        n = x.shape[0]
        u = torch.rand(n, DRAWS, generator=self.generator, device=self.device)
        if s.crop_scale is not None:
            x = self._crop_and_flip(x, u)
        elif s.flip > 0:
            flip = (u[:, 4] < s.flip).view(n, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
        if s.jitter > 0:
            x = self._jitter(x, u)
        if s.erase > 0:
            x = self._erase(x, u)
        return x

    def _crop_and_flip(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """A random resized crop (and flip) of each image, back to the image's size."""
        n = x.shape[0]
        lo, hi = self.settings.crop_scale  # type: ignore[misc]
        area = lo + (hi - lo) * u[:, 0]
        log_ratio = math.log(RATIO[0]) + (math.log(RATIO[1]) - math.log(RATIO[0])) * u[:, 1]
        ratio = torch.exp(log_ratio)
        w = torch.sqrt(area * ratio).clamp(max=1.0)  # fractions of the image's width, height
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (1 - w) * (2 * u[:, 2] - 1)  # the centre, in [-1, 1] coordinates
        cy = (1 - h) * (2 * u[:, 3] - 1)
        sign = torch.where(u[:, 4] < self.settings.flip, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _jitter(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast, then saturation (colour images), each by its own factor."""
        n = x.shape[0]
        j = self.settings.jitter
        factor = (1 - j + 2 * j * u[:, 5:8]).view(n, 3, 1, 1, 1)
        pixels = (x * self.std + self.mean).clamp_(0, 1)  # back to [0, 1]
        pixels = (pixels * factor[:, 0]).clamp_(0, 1)
        mean = _gray(pixels).mean(dim=(1, 2, 3), keepdim=True)
        pixels = ((pixels - mean) * factor[:, 1] + mean).clamp_(0, 1)
        if pixels.shape[1] == 3:
            gray = _gray(pixels)
            pixels = ((pixels - gray) * factor[:, 2] + gray).clamp_(0, 1)
        return (pixels - self.mean) / self.std

    def _erase(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """One rectangle per chosen image set to the mean (0 once normalised)."""
        n, _, height, width = x.shape
        area = ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * u[:, 8]
        lr0, lr1 = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
        ratio = torch.exp(lr0 + (lr1 - lr0) * u[:, 9])
        h = (torch.sqrt(area * ratio) * height).clamp(1, height)
        w = (torch.sqrt(area / ratio) * width).clamp(1, width)
        top = ((height - h) * u[:, 10]).floor()
        left = ((width - w) * u[:, 11]).floor()
        rows = torch.arange(height, device=x.device).view(1, height, 1)
        cols = torch.arange(width, device=x.device).view(1, 1, width)
        inside = (
            (rows >= top.view(n, 1, 1))
            & (rows < (top + h).view(n, 1, 1))
            & (cols >= left.view(n, 1, 1))
            & (cols < (left + w).view(n, 1, 1))
        )
        chosen = (u[:, 12] < self.settings.erase).view(n, 1, 1)
        return x.masked_fill((inside & chosen).unsqueeze(1), 0.0)


def _gray(pixels: torch.Tensor) -> torch.Tensor:
    """Luma (ITU-R 601) of [0, 1] pixels, shape (N, 1, H, W)."""
    if pixels.shape[1] == 1:
        return pixels
    r, g, b = pixels[:, 0:1], pixels[:, 1:2], pixels[:, 2:3]
    return 0.299 * r + 0.587 * g + 0.114 * b
