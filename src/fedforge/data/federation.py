"""Federation: one pooled tensor plus per-client index views; batches are cut and converted on the fly."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ..errors import ConfigError
from .partition import Partition
from .sources import Dataset


def check_augment(dataset: Dataset, augment: bool) -> None:
    """``--augment`` (random crops and flips) applies to images only; ConfigError naming the fix otherwise."""
    modality = getattr(dataset, "modality", "image")
    if augment and modality != "image":
        raise ConfigError(f"--augment (random crop and flip) applies to images only, and {dataset.name} holds "
                          f"{modality} data; leave --augment out.")


class Federation:
    """Per-client train/test views over one pooled dataset (no per-client copies).

    A batch is made by indexing the pooled tensor (on the run's device) and converting only that batch:
    images (uint8 NHWC) become normalised float NCHW (channels-last in memory, which convolutions on CPU prefer);
    series (float32 (N, C, L)) and vectors (float32 (N, D)) are standardised per channel/feature with the
    dataset's ``mean``/``std``; tokens become int64 ids (N, L), unchanged.
    """

    def __init__(self, dataset: Dataset, partition: Partition, device: str | torch.device = "cpu", augment: bool = False):
        check_augment(dataset, augment)
        self.dataset = dataset
        self.partition = partition
        self.device = torch.device(device)
        self.modality = getattr(dataset, "modality", "image")
        self.x = torch.from_numpy(np.ascontiguousarray(dataset.x))  # shares memory with the numpy array
        self.y = torch.from_numpy(np.ascontiguousarray(dataset.y, dtype=np.int64))
        if self.device.type != "cpu":
            self.x, self.y = self.x.to(self.device), self.y.to(self.device)
        self.train_idx = [torch.as_tensor(a, dtype=torch.long, device=self.device) for a in partition.train]
        self.test_idx = [torch.as_tensor(a, dtype=torch.long, device=self.device) for a in partition.test]
        if self.modality == "image":
            c = dataset.input_shape[0]
            std = torch.tensor(dataset.std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
            mean = torch.tensor(dataset.mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
            self._scale = 1.0 / (255.0 * std)
            self._shift = -mean / std
        elif self.modality in ("series", "vector"):
            shape = (1, -1, 1) if self.modality == "series" else (1, -1)
            self._mean = torch.tensor(dataset.mean, dtype=torch.float32, device=self.device).view(shape)
            self._std = torch.tensor(dataset.std, dtype=torch.float32, device=self.device).view(shape)
        self.augment = augment
        self.num_classes = dataset.num_classes
        self.input_shape = dataset.input_shape

    @property
    def num_clients(self) -> int:
        return len(self.train_idx)

    def num_train(self, cid: int) -> int:
        return int(self.train_idx[cid].numel())

    def num_test(self, cid: int) -> int:
        return int(self.test_idx[cid].numel())

    def train_labels(self, cid: int) -> torch.Tensor:
        return self.y[self.train_idx[cid]]

    def class_counts(self, cid: int, part: str = "train") -> torch.Tensor:
        idx = self.train_idx[cid] if part == "train" else self.test_idx[cid]
        return torch.bincount(self.y[idx], minlength=self.num_classes)

    def to_input(self, xb: torch.Tensor) -> torch.Tensor:
        """A batch of pooled samples → model input: images uint8 NHWC → normalised float32 NCHW (channels-last
        strides); series/vectors → standardised float32; tokens → int64 ids."""
        if self.modality == "image":
            return xb.permute(0, 3, 1, 2).float().mul_(self._scale).add_(self._shift)
        if self.modality == "tokens":
            return xb.long()
        return (xb.float() - self._mean) / self._std

    def inputs(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.to_input(self.x[idx]), self.y[idx]

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random crop (pad 4 for 32×32, 2 otherwise) and, for colour images, horizontal flip."""
        n, c, h, w = x.shape
        pad = 4 if h >= 32 else 2
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect" if h > pad else "constant")
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
        if c == 3:
            flip = torch.rand(n, generator=gen) < 0.5
            out[flip] = out[flip].flip(-1)
        return out.contiguous(memory_format=torch.channels_last)

    def train_batches(self, cid: int, batch_size: int, generator: torch.Generator, epochs: int = 1,
                      fraction: float = 1.0, drop_last: bool = True,
                      subset: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled mini-batches of client ``cid``'s training data for ``epochs`` passes.

        ``drop_last`` drops an incomplete final batch (as PFLlib's loader does) unless it is the only one.
        ``fraction`` < 1 takes a random subset of that size each epoch.
        ``subset`` (positions within the client's training indices) restricts the batches to those samples,
        e.g. the training part when a method holds out a validation split (FedFomo).
        """
        idx = self.train_indices(cid, subset)
        for pos in self.train_positions(idx.numel(), batch_size, generator, epochs, fraction, drop_last):
            x, y = self.inputs(idx[pos])
            if self.augment:
                x = self._augment(x, generator)
            yield x, y

    def train_indices(self, cid: int, subset: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled indices of client ``cid``'s training samples (restricted to ``subset`` positions if given)."""
        idx = self.train_idx[cid]
        if subset is not None:
            idx = idx[torch.as_tensor(subset, dtype=torch.long, device=idx.device)]
        return idx

    def train_positions(self, n: int, batch_size: int, generator: torch.Generator, epochs: int = 1,
                        fraction: float = 1.0, drop_last: bool = True) -> Iterator[torch.Tensor]:
        """The batch order of :meth:`train_batches` as positions in ``0..n-1`` (same draws from ``generator``)."""
        if n == 0:
            return
        for _ in range(epochs):
            perm = torch.randperm(n, generator=generator)
            if self.device.type != "cpu":
                perm = perm.to(self.device)
            if fraction < 1.0:
                perm = perm[: max(1, int(round(n * fraction)))]
            m = perm.numel()
            stop = m - (m % batch_size) if (drop_last and m > batch_size) else m
            for s in range(0, stop, batch_size):
                yield perm[s : s + batch_size]

    def num_batches(self, cid: int, batch_size: int, epochs: int = 1, fraction: float = 1.0, drop_last: bool = True) -> int:
        n = self.num_train(cid)
        m = max(1, int(round(n * fraction))) if fraction < 1.0 else n
        if m == 0:
            return 0
        per = m // batch_size if (drop_last and m > batch_size) else -(-m // batch_size)
        return per * epochs

    def test_batches(self, cid: int, batch_size: int = 512, part: str = "test") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Unshuffled batches of a client's test (or train) data."""
        idx = self.test_idx[cid] if part == "test" else self.train_idx[cid]
        for s in range(0, idx.numel(), batch_size):
            yield self.inputs(idx[s : s + batch_size])
