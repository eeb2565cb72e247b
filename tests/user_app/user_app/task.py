"""The user's model, input transform and data (Flower's quickstart-pytorch, on MNIST)."""

import torch
from torch import nn
from torch.nn import functional as F

from flwr_select import SiteData, load_mnist


class Net(nn.Module):
    """The quickstart's CNN for 1x28x28 float input in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def to_input(batch: torch.Tensor) -> torch.Tensor:
    """Raw uint8 (n, 28, 28) -> float (n, 1, 28, 28) in [-1, 1], as ToTensor + Normalize."""
    return (batch.unsqueeze(1).float() / 255 - 0.5) / 0.5


SERVER_SAMPLES, TEST_SAMPLES, SITE_ROUND_SAMPLES = 1000, 2000, 1000


def server_samples(data_dir: str) -> SiteData:
    """Samples the server holds itself: the first of the training set."""
    images, labels = load_mnist(data_dir)
    return SiteData(images[:SERVER_SAMPLES], labels[:SERVER_SAMPLES], 10)


def test_samples(data_dir: str) -> SiteData:
    """The server's held-out set, from MNIST's test split."""
    images, labels = load_mnist(data_dir, "test")
    return SiteData(images[:TEST_SAMPLES], labels[:TEST_SAMPLES], 10)


def site_samples(data_dir: str, site: int, server_round: int) -> SiteData:
    """A site's samples this round: its own slice of the rest of the training set."""
    images, labels = load_mnist(data_dir)
    start = SERVER_SAMPLES + (2 * site + server_round - 1) * SITE_ROUND_SAMPLES
    ids = torch.arange(start, start + SITE_ROUND_SAMPLES)
    return SiteData(images[ids], labels[ids], 10, ids=ids)
