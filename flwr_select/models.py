"""The paper's models, by name, taking raw ``uint8`` image batches; input transforms.

Each model starts with :class:`Standardize`, so sites and the server feed it the
``uint8`` tensors they hold and normalisation happens per batch on the device,
in exactly one place. Its mean and std are buffers, so they travel with the
model's arrays.

A model of the user's own (one that takes float batches with a channel axis,
say) gets a *transform*: a name from :data:`INPUT_TRANSFORMS` or a callable,
applied to every ``uint8`` batch on the device before the model sees it. Sites
and the server must use the same one; :func:`check_model` tries the pair on a
dummy batch so that a mismatch fails at once, naming the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

BatchTransform = Callable[[Tensor], Tensor]
"""Maps a ``uint8`` batch on the device to what the model takes."""

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class Standardize(nn.Module):
    """Map a ``uint8`` batch to floats: ``(x / 255 - mean) / std`` per channel.

    A ``(B, H, W)`` batch gets a channel axis, giving ``(B, 1, H, W)``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        """Return the standardized float batch."""
        if images.ndim == 3:
            images = images.unsqueeze(1)
        return (images.float() / 255.0 - self.mean) / self.std


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998, the paper's [15]) for 28x28 single-channel input.

    The classic layout with ReLU and max pooling: conv 6@5x5 (padding 2, as the
    original sees 32x32), pool, conv 16@5x5, pool, then 120, 84 and
    ``num_classes`` units. ``channels``, ``hidden`` and ``dropout`` (before each
    fully connected layer) widen it: :func:`wide_lenet5` is the same family
    with 32 and 64 feature maps.
    """

    def __init__(
        self,
        num_classes: int = 10,
        mean: Sequence[float] = MNIST_MEAN,
        std: Sequence[float] = MNIST_STD,
        *,
        channels: tuple[int, int] = (6, 16),
        hidden: tuple[int, ...] = (120, 84),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        first, second = channels
        self.standardize = Standardize(mean, std)
        self.features = nn.Sequential(
            nn.Conv2d(1, first, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(first, second, 5), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        widths = [second * 5 * 5, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for width_in, width_out in zip(widths, widths[1:], strict=False):
            layers += [nn.Dropout(dropout)] if dropout else []
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        layers += [nn.Dropout(dropout)] if dropout else []
        self.classifier = nn.Sequential(*layers, nn.Linear(widths[-1], num_classes))

    def forward(self, images: Tensor) -> Tensor:
        """Return logits for a ``uint8`` batch ``(B, 28, 28)`` or ``(B, 1, 28, 28)``."""
        return self.classifier(self.features(self.standardize(images)))


def wide_lenet5(num_classes: int = 10, **options: object) -> LeNet5:
    """LeNet-5 with 32 and 64 feature maps, 128 hidden units and dropout 0.25.

    The paper's model family, wide enough to learn 28x28 digits from 5k
    samples to about 98.8% (LeNet-5: about 98.3%, both with augmentation).
    """
    return LeNet5(
        num_classes, channels=(32, 64), hidden=(128,), dropout=0.25, **options
    )


class CifarCNN(nn.Module):
    """The CIFAR-10 network of the paper's [16] (as in the TensorFlow tutorial).

    Two 5x5 conv layers of 64 filters, each followed by 3x3/2 max pooling and
    local response normalisation (radius 4, alpha 0.001/9, beta 0.75), then 384 and
    192 fully connected units. Takes 32x32 RGB input.
    """

    def __init__(
        self,
        num_classes: int = 10,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        # torch divides alpha by size, TensorFlow does not: 0.001/9 * 9 = 0.001.
        lrn = {"size": 9, "alpha": 0.001, "beta": 0.75, "k": 1.0}
        self.standardize = Standardize(mean, std)
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 5, padding=2), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1), nn.LocalResponseNorm(**lrn),
            nn.Conv2d(64, 64, 5, padding=2), nn.ReLU(),
            nn.LocalResponseNorm(**lrn), nn.MaxPool2d(3, stride=2, padding=1),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 8 * 8, 384), nn.ReLU(),
            nn.Linear(384, 192), nn.ReLU(),
            nn.Linear(192, num_classes),
        )  # fmt: skip

    def forward(self, images: Tensor) -> Tensor:
        """Return logits for a ``uint8`` batch ``(B, 3, 32, 32)``."""
        return self.classifier(self.features(self.standardize(images)))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": LeNet5,
    "lenet5-wide": wide_lenet5,
    "cifar-cnn": CifarCNN,
}
"""Model constructors by the name a run config uses."""


def build_model(name: str, *, seed: int | None = None, **options: object) -> nn.Module:
    """Return a fresh model called ``name``; with ``seed``, the same weights each time.

    Examples
    --------
    >>> build_model("lenet5", seed=0)(torch.zeros(2, 28, 28, dtype=torch.uint8)).shape
    torch.Size([2, 10])
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if seed is None:
        return MODELS[name](**options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](**options)


def _with_channel_axis(batch: Tensor) -> Tensor:
    """Return a ``(B, H, W)`` batch as ``(B, 1, H, W)``; others as they are."""
    return batch.unsqueeze(1) if batch.ndim == 3 else batch


def raw_input(batch: Tensor) -> Tensor:
    """Return the ``uint8`` batch as stored (the built-in models standardize it)."""
    return batch


def unit_input(batch: Tensor) -> Tensor:
    """Return floats in [0, 1] with a channel axis (torchvision's ``ToTensor``)."""
    return _with_channel_axis(batch).float() / 255.0


def signed_input(batch: Tensor) -> Tensor:
    """Return floats in [-1, 1] with a channel axis (``ToTensor`` + ``Normalize``).

    As torchvision's ``Normalize((0.5,), (0.5,))`` after ``ToTensor``, the
    transform of Flower's quickstart examples.
    """
    return _with_channel_axis(batch).float() / 127.5 - 1.0


INPUT_TRANSFORMS: dict[str, BatchTransform] = {
    "raw": raw_input,
    "unit": unit_input,
    "signed": signed_input,
}
"""How raw ``uint8`` samples become model input, by name (see :func:`model_input`)."""

Transform = str | BatchTransform | None
"""A name from :data:`INPUT_TRANSFORMS`, a callable, or None (``"raw"``)."""


def model_input(transform: Transform) -> BatchTransform:
    """Return the batch transform ``transform`` names (or is).

    Examples
    --------
    >>> model_input("unit")(torch.full((2, 28, 28), 255, dtype=torch.uint8)).shape
    torch.Size([2, 1, 28, 28])
    """
    if transform is None:
        return raw_input
    if callable(transform):
        return transform
    if transform not in INPUT_TRANSFORMS:
        raise ValueError(
            f"unknown transform {transform!r}: choose one of "
            f"{sorted(INPUT_TRANSFORMS)} or pass a callable (uint8 batch -> input)"
        )
    return INPUT_TRANSFORMS[transform]


def check_model(
    model: nn.Module,
    sample_shape: Sequence[int],
    num_classes: int,
    transform: Transform = None,
) -> None:
    """Raise ``ValueError`` unless ``model`` takes this data's batches as it will.

    A dummy ``uint8`` batch of two samples of ``sample_shape`` goes through
    ``transform`` and the model (in eval mode, on the model's device); the
    logits must be ``(2, num_classes)``. The error says what failed and how to
    fix it, before any round rather than at every site in every round.
    """
    device = next(model.parameters()).device
    batch = torch.zeros((2, *sample_shape), dtype=torch.uint8, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            logits = model(model_input(transform)(batch))
        problem = None
        if not isinstance(logits, Tensor) or tuple(logits.shape) != (2, num_classes):
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else logits
            problem = f"returned {shape!r}, not logits of shape (2, {num_classes})"
    except Exception as err:  # whatever the user's model raises, explain it
        problem = f"raised {err!r}"
    finally:
        model.train(was_training)
    if problem is not None:
        name = getattr(transform, "__name__", transform)
        given = "as stored" if transform is None else f"through transform {name!r}"
        raise ValueError(
            f"the model cannot take this data: a uint8 batch of shape "
            f"(2, {', '.join(map(str, sample_shape))}) {given} {problem}. Say how raw "
            "samples become model input with transform= (one of "
            f"{sorted(INPUT_TRANSFORMS)}, or a callable uint8 batch -> input), the "
            "same on the server (SampleSelection) and the sites (add_select_handler)"
        )
