"""The known transform of a synthetic case, in RAS millimetres, built and inverted with numpy only.

    Phi(x) = A (x + u(x)),   u(x) = sum_k a_k exp(-|x - c_k|^2 / (2 s_k^2))

maps a point x of the fixed image to its partner y in the moving image: the moving image is built
as M(y) = I(Phi^-1(y)) from the source I, and the fixed image is I itself (on another grid). A
registration with fixed F and moving M outputs the map x -> y, so a perfect one returns Phi.
u is a sum of Gaussian bumps: smooth, analytic (exact derivatives, no interpolation) and a few mm.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

_CHUNK = 1_000_000  # points per block: bounds memory on whole-head grids


@dataclass(frozen=True)
class Bumps:
    """A displacement field u(x) = sum_k a_k exp(-|x - c_k|^2 / (2 s_k^2)) (mm)."""

    centres: np.ndarray  # (K, 3) RAS mm
    sigmas: np.ndarray  # (K,) mm
    amplitudes: np.ndarray  # (K, 3) mm

    def displacement(self, points: np.ndarray) -> np.ndarray:
        out = np.zeros_like(points, dtype=float)
        for centre, sigma, amplitude in zip(
            self.centres, self.sigmas, self.amplitudes, strict=True
        ):
            weight = np.exp(-np.sum((points - centre) ** 2, axis=1) / (2 * sigma**2))
            out += weight[:, None] * amplitude
        return out

    def gradient(self, points: np.ndarray) -> np.ndarray:
        """du_i/dx_j at each point, shape (N, 3, 3)."""
        out = np.zeros((len(points), 3, 3))
        for centre, sigma, amplitude in zip(
            self.centres, self.sigmas, self.amplitudes, strict=True
        ):
            offset = points - centre
            weight = np.exp(-np.sum(offset**2, axis=1) / (2 * sigma**2))
            out += (
                (weight / -(sigma**2))[:, None, None]
                * amplitude[None, :, None]
                * offset[:, None, :]
            )
        return out

    def scaled(self, factor: float) -> Bumps:
        return Bumps(self.centres, self.sigmas, self.amplitudes * factor)

    def to_json(self) -> dict:
        return {
            "centres_mm": self.centres.tolist(),
            "sigmas_mm": self.sigmas.tolist(),
            "amplitudes_mm": self.amplitudes.tolist(),
        }

    @classmethod
    def from_json(cls, data: dict) -> Bumps:
        return cls(
            np.asarray(data["centres_mm"], float).reshape(-1, 3),
            np.asarray(data["sigmas_mm"], float),
            np.asarray(data["amplitudes_mm"], float).reshape(-1, 3),
        )


@dataclass(frozen=True)
class KnownTransform:
    """Phi(x) = A (x + u(x)): fixed-image points (RAS mm) to moving-image points."""

    affine: np.ndarray  # 4x4 RAS
    bumps: Bumps

    def forward(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, float)
        inner = points + self.bumps.displacement(points)
        return inner @ self.affine[:3, :3].T + self.affine[:3, 3]

    def jacobian_determinant(self, points: np.ndarray) -> np.ndarray:
        """det(D Phi) = det(A) det(I + Du), exactly."""
        points = np.asarray(points, float)
        local = np.concatenate(
            [
                np.linalg.det(np.eye(3) + self.bumps.gradient(points[start : start + _CHUNK]))
                for start in range(0, len(points), _CHUNK)
            ]
            or [np.zeros(0)]
        )
        return np.linalg.det(self.affine[:3, :3]) * local

    def inverse(self, points: np.ndarray, tolerance_mm: float = 1e-4, max_iterations: int = 100):
        """Phi^-1 by fixed-point iteration on x = z - u(x), z = A^-1 y (u is a contraction).

        Returns the points and the largest residual |Phi(x) - y| (mm), checked by the caller."""
        points = np.asarray(points, float)
        inverse_affine = np.linalg.inv(self.affine)
        out = np.empty_like(points)
        worst = 0.0
        for start in range(0, len(points), _CHUNK):
            target = (
                points[start : start + _CHUNK] @ inverse_affine[:3, :3].T + inverse_affine[:3, 3]
            )
            guess = target.copy()
            for _ in range(max_iterations):
                updated = target - self.bumps.displacement(guess)
                step = np.abs(updated - guess).max(initial=0.0)
                guess = updated
                if step < tolerance_mm / 10:
                    break
            out[start : start + _CHUNK] = guess
            error = np.linalg.norm(self.forward(guess) - points[start : start + _CHUNK], axis=1)
            worst = max(worst, float(error.max(initial=0.0)))
        return out, worst

    def to_json(self) -> dict:
        return {
            "formula": "y = A (x + u(x)); u(x) = sum_k a_k exp(-|x - c_k|^2 / (2 s_k^2)); "
            "x: fixed-image RAS mm, y: moving-image RAS mm",
            "affine_ras": self.affine.tolist(),
            "bumps": self.bumps.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict) -> KnownTransform:
        return cls(np.asarray(data["affine_ras"], float), Bumps.from_json(data["bumps"]))


@dataclass(frozen=True)
class AffineLimits:
    """The issue's limits for the random affine."""

    rotation_deg: float = 15.0
    translation_mm: float = 20.0
    scale_range: tuple[float, float] = (0.85, 1.15)
    shear: float = 0.05


def random_affine(rng: np.random.Generator, centre: np.ndarray, limits=AffineLimits()):
    """Rotation, scaling and shear about ``centre``, then a translation (4x4, RAS mm)."""
    from scipy.spatial.transform import Rotation

    angles = rng.uniform(-limits.rotation_deg, limits.rotation_deg, 3)
    rotation = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    scales = np.diag(rng.uniform(*limits.scale_range, 3))
    shear = np.eye(3)
    shear[np.triu_indices(3, 1)] = rng.uniform(-limits.shear, limits.shear, 3)
    matrix = rotation @ scales @ shear
    translation = rng.uniform(-limits.translation_mm, limits.translation_mm, 3)
    affine = np.eye(4)
    affine[:3, :3] = matrix
    affine[:3, 3] = centre + translation - matrix @ centre
    return affine


def random_bumps(
    rng: np.random.Generator,
    inside_points: np.ndarray,
    max_displacement_mm: float,
    count: int = 10,
    sigma_range_mm: tuple[float, float] = (12.0, 25.0),
) -> Bumps:
    """Bumps centred on random points of the brain, scaled so max |u| over ``inside_points``
    equals ``max_displacement_mm``."""
    centres = inside_points[rng.choice(len(inside_points), count, replace=False)]
    sigmas = rng.uniform(*sigma_range_mm, count)
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    amplitudes = directions * rng.uniform(0.5, 1.0, count)[:, None]
    bumps = Bumps(centres, sigmas, amplitudes)
    peak = np.linalg.norm(bumps.displacement(inside_points), axis=1).max()
    return bumps.scaled(max_displacement_mm / peak)
