"""Noise generators and the Gaussian mechanism's noise.

DP noise must be unpredictable to whoever sees the released model: a noise
stream an attacker can replay lets them subtract the noise and read the clipped
sum. `NoiseSource.secure()` therefore seeds numpy's PCG64 from the operating
system's CSPRNG (`secrets`, 128 bits through a `SeedSequence`). PCG64 itself is
a statistical generator, not a cryptographic one: its outputs are never
published alone (they are added to data), which is the threat model numpy-based
DP libraries accept; a deployment that needs a cryptographic stream can pass
any `numpy.random.Generator` built on such a bit generator.

A fixed seed exists for tests and simulation only, and says so: every source
carries `seeded`, which the caller records in the run's metadata and output so
that a seeded (non-private) run is never mistaken for a private one.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from fedcore import Array

__all__ = ["GaussianNoise", "NoiseSource"]


@dataclass(frozen=True, slots=True)
class NoiseSource:
    """A random generator for DP noise, and whether it was seeded by hand.

    Attributes:
        generator: the numpy generator every draw comes from.
        seeded: True when built from a fixed seed (tests, simulation): the
            noise is then reproducible and gives NO privacy. Record it in the
            run's metadata and output.
    """

    generator: np.random.Generator
    seeded: bool

    @classmethod
    def secure(cls) -> NoiseSource:
        """Return a source seeded with 128 bits from the OS CSPRNG."""
        sequence = np.random.SeedSequence(entropy=secrets.randbits(128))
        return cls(generator=np.random.Generator(np.random.PCG64(sequence)), seeded=False)

    @classmethod
    def from_seed(cls, seed: int) -> NoiseSource:
        """Return a reproducible source for tests and simulation (flagged `seeded`).

        Raises:
            ValueError: `seed` is negative.
        """
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        sequence = np.random.SeedSequence(entropy=seed)
        return cls(generator=np.random.Generator(np.random.PCG64(sequence)), seeded=True)


@dataclass(frozen=True, slots=True)
class GaussianNoise:
    """Gaussian noise of standard deviation `multiplier * clip_norm` per coordinate.

    The noise multiplier z is the ratio of the noise's standard deviation to
    the L2 sensitivity (the clipping norm), as in Abadi et al. (CCS 2016) and
    McMahan et al. (ICLR 2018).
    """

    multiplier: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.multiplier) or self.multiplier <= 0:
            raise ValueError(f"noise multiplier must be finite and > 0, got {self.multiplier!r}")

    def std(self, clip_norm: float) -> float:
        """Return the noise's standard deviation for sensitivity `clip_norm`."""
        return self.multiplier * clip_norm

    def draw(self, shape: tuple[int, ...], *, clip_norm: float, source: NoiseSource) -> Array:
        """Return float64 noise of `shape` with standard deviation `multiplier * clip_norm`."""
        return source.generator.normal(0.0, self.std(clip_norm), size=shape)
