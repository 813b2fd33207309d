"""Training curves that look like a real run: loss falls, accuracy rises, both with noise.

The seed logged `random.uniform` values, which no dashboard, downsampler or anomaly detector sees in
practice. Here each simulated run draws its own learning speed and plateau, then, per step:

    progress      = 1 - exp(-step / tau)                       (tau: steps to ~63% of the way)
    train/loss    = floor + (start - floor) * (1 - progress) * (1 + noise)
    val/loss      = train/loss * (1 + overfit * progress) * (1 + noise)
    train/accuracy= plateau - (plateau - chance) * (1 - progress) + noise     (clipped to [0, 1])
    val/accuracy  = train/accuracy - gap * progress + noise
    learning_rate = warm-up over `warmup` steps, then cosine decay over `total_steps`

so every series is smooth at large scale and noisy at small scale, and two runs differ.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

METRIC_KEYS = ("train/loss", "train/accuracy", "val/loss", "val/accuracy", "learning_rate")
"""The five metrics the seed logs on every step."""


@dataclass
class TrainingCurve:
    """One run's metric curves; deterministic for a given `rng` state."""

    rng: random.Random
    total_steps: int = 10_000
    steps_per_epoch: int = 100
    warmup: int = 100
    peak_lr: float = 1e-3
    noise: float = 0.03
    tau: float = field(init=False)
    start_loss: float = field(init=False)
    floor: float = field(init=False)
    plateau: float = field(init=False)
    chance: float = field(init=False)
    gap: float = field(init=False)
    overfit: float = field(init=False)

    def __post_init__(self) -> None:
        r = self.rng
        self.tau = r.uniform(0.08, 0.3) * self.total_steps
        self.start_loss = r.uniform(1.8, 2.6)
        self.floor = r.uniform(0.05, 0.3)
        self.plateau = r.uniform(0.88, 0.98)
        self.chance = r.uniform(0.05, 0.2)
        self.gap = r.uniform(0.02, 0.08)
        self.overfit = r.uniform(0.05, 0.4)

    def _noisy(self, value: float, scale: float | None = None) -> float:
        return value * (1.0 + self.rng.gauss(0.0, self.noise if scale is None else scale))

    def learning_rate(self, step: int) -> float:
        """Linear warm-up, then cosine decay to a tenth of the peak."""
        if step < self.warmup:
            return self.peak_lr * (step + 1) / self.warmup
        done = min(1.0, (step - self.warmup) / max(1, self.total_steps - self.warmup))
        return self.peak_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * done)))

    def metrics(self, step: int) -> dict[str, float]:
        """The five seed metrics at `step`."""
        progress = 1.0 - math.exp(-step / self.tau)
        train_loss = max(1e-4, self._noisy(self.floor + (self.start_loss - self.floor) * (1.0 - progress)))
        val_loss = max(1e-4, self._noisy(train_loss * (1.0 + self.overfit * progress)))
        train_acc = self.plateau - (self.plateau - self.chance) * (1.0 - progress)
        train_acc = min(1.0, max(0.0, train_acc + self.rng.gauss(0.0, self.noise / 3)))
        val_acc = min(1.0, max(0.0, train_acc - self.gap * progress + self.rng.gauss(0.0, self.noise / 3)))
        return {
            "train/loss": round(train_loss, 6),
            "train/accuracy": round(train_acc, 6),
            "val/loss": round(val_loss, 6),
            "val/accuracy": round(val_acc, 6),
            "learning_rate": round(self.learning_rate(step), 9),
        }

    def batch(self, step: int) -> dict[str, float | int]:
        """Per-batch figures (the seed's `batch_loss`, `batch_size`, `gpu_util`)."""
        loss = self.metrics(step)["train/loss"]
        return {
            "batch_loss": round(max(1e-4, self._noisy(loss, self.noise * 4)), 6),
            "batch_size": self.rng.choice((16, 32, 64, 128)),
            "gpu_util": round(min(1.0, max(0.0, self.rng.gauss(0.9, 0.05))), 4),
        }

    def epoch(self, step: int) -> int:
        """The epoch a step falls in."""
        return step // self.steps_per_epoch
