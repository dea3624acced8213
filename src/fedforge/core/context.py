"""What every algorithm may know about the federation (picklable; sent to every worker)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..models import FedModel, create_model


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings (stable across processes and machines)."""
    ints = []
    for p in parts:
        if isinstance(p, str):
            ints.append(int.from_bytes(p.encode()[:8].ljust(8, b"\0"), "little"))
            ints.append(len(p))
        else:
            ints.append(int(p) & 0xFFFFFFFFFFFF)
    return int(np.random.SeedSequence(ints).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class Context:
    num_clients: int
    num_classes: int
    input_shape: tuple[int, ...]  # (C, H, W) images, (C, L) series, (L,) tokens, (D,) vectors
    archs: tuple[str, ...]  # one registered model name per client
    seed: int
    rounds: int
    lr: float
    batch_size: int
    local_epochs: int
    train_sizes: tuple[int, ...]
    test_sizes: tuple[int, ...]
    device: str = "cpu"
    precision: str = "fp32"
    eval_batch_size: int = 500
    optimizer: str = "sgd"  # local optimiser: sgd, momentum or adam (core.training.Optimizer)
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_decay: float = 1.0  # the local learning rate of round r is lr · lr_decay^(r−1)
    generator: str | None = None  # generator spec of generator-assisted algorithms (None: their default)
    trust_generator_pickle: bool = False
    vocab_size: int | None = None  # token data: the number of token ids (reaches create_model); None otherwise
    dp: Any = None  # client-level DP-SGD (core.dp.ClientDP, --dp-epsilon): every rt.train step is private

    def arch(self, cid: int) -> str:
        return self.archs[cid]

    @property
    def arch_set(self) -> list[str]:
        return list(dict.fromkeys(self.archs))

    @property
    def homogeneous(self) -> bool:
        return len(set(self.archs)) == 1

    def init_seed(self, arch: str) -> int:
        """All clients of one architecture start from the same weights (as in PFLlib and HtFLlib)."""
        return derive_seed(self.seed, "init", arch)

    def build_model(self, arch: str | None = None, seed: int | None = None) -> FedModel:
        arch = arch or self.archs[0]
        return create_model(arch, self.input_shape, self.num_classes, seed=self.init_seed(arch) if seed is None else seed,
                            vocab_size=self.vocab_size)
