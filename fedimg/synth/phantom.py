"""An analytic abdomen-like phantom with known Hounsfield units and labels.

The phantom lives in DICOM patient coordinates (LPS, millimetres: +x towards
the patient's left, +y posterior, +z superior) and is centred near the
origin. Because it is analytic it can be sampled on any grid, which is what
lets every site acquire "the same kind of patient" with its own geometry while
the ground truth stays exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

CLASS_NAMES: tuple[str, ...] = ("organ", "lesion")
"""Foreground classes; label value ``i + 1`` is ``CLASS_NAMES[i]`` and 0 is background."""

AIR_HU = -1000.0

# Lesion probability ~60%: enough positives and negatives for a classifier.
_LESION_PROBABILITY = 0.6
# The organ stays within this distance of the origin on every axis so that
# every site's field of view (>= 180 mm along each axis) contains it fully.
_ORGAN_EXTENT_LIMIT_MM = 75.0
_ORGAN_MARGIN = 0.85
_LESION_MARGIN = 0.9


@dataclass(frozen=True)
class Ellipsoid:
    """An axis-aligned ellipsoid in LPS millimetres.

    Attributes:
        centre: centre (x, y, z) in mm.
        semi_axes: semi-axes along x (L-R), y (A-P), z (S-I) in mm.
    """

    centre: tuple[float, float, float]
    semi_axes: tuple[float, float, float]

    def normalized_radius_sq(self, points: np.ndarray) -> np.ndarray:
        """Squared normalized radius of ``(N, 3)`` points; <= 1 inside the ellipsoid."""
        columns = np.ascontiguousarray(np.asarray(points, dtype=np.float64).T)
        return self._radius_sq_xyz(columns[0], columns[1], columns[2])

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Boolean mask of the ``(N, 3)`` points inside (or on) the ellipsoid."""
        return self.normalized_radius_sq(points) <= 1.0

    def _radius_sq_xyz(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        # Per-coordinate arithmetic on contiguous 1-D arrays is ~2x faster than
        # broadcasting over an (N, 3) array, and this is the hot loop of synthesis.
        total = np.zeros(x.shape, dtype=np.float64)
        for values, centre, semi_axis in zip((x, y, z), self.centre, self.semi_axes):
            term = values - centre
            term *= 1.0 / semi_axis
            term *= term
            total += term
        return total

    @property
    def volume_mm3(self) -> float:
        """Volume in cubic millimetres."""
        a, b, c = self.semi_axes
        return 4.0 / 3.0 * math.pi * a * b * c

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description."""
        return {"centre_lps_mm": list(self.centre), "semi_axes_mm": list(self.semi_axes)}


@dataclass(frozen=True)
class Phantom:
    """Body, organ and optional lesion with their Hounsfield units.

    Attributes:
        body: the body outline; air outside.
        body_hu: mean soft-tissue HU of the body.
        body_variation: smooth low-frequency HU variation of the body, as
            ``((kx, ky, kz), phase, amplitude_hu)`` cosine terms (k in rad/mm).
        organ: the organ, fully inside the body.
        organ_hu: HU of the organ (contrast-enhanced, homogeneous).
        lesion: a spherical hypodense lesion inside the organ, or None.
        lesion_hu: HU of the lesion, or None.
    """

    body: Ellipsoid
    body_hu: float
    body_variation: tuple[tuple[tuple[float, float, float], float, float], ...]
    organ: Ellipsoid
    organ_hu: float
    lesion: Ellipsoid | None
    lesion_hu: float | None

    @classmethod
    def random(cls, rng: np.random.Generator) -> Phantom:
        """Draw a phantom.

        Args:
            rng: the generator to draw from; the same state gives the same
                phantom.

        Returns:
            A phantom whose organ lies fully inside the body (with margin) and
            whose lesion, when present (~60% of draws), lies fully inside the
            organ.
        """
        body_axes = (
            float(rng.uniform(75.0, 95.0)),
            float(rng.uniform(55.0, 75.0)),
            float(rng.uniform(65.0, 85.0)),
        )
        body_centre = tuple(float(v) for v in rng.uniform(-5.0, 5.0, size=3))
        body = Ellipsoid(_round3(body_centre), _round3(body_axes))
        body_hu = float(rng.uniform(10.0, 30.0))
        variation = []
        for _ in range(3):
            # Wavelengths of 80-200 mm: smooth over an organ, visible over the body.
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            wavenumber = 2.0 * math.pi / rng.uniform(80.0, 200.0)
            kx, ky, kz = (round(float(v), 6) for v in direction * wavenumber)
            phase = round(float(rng.uniform(0.0, 2.0 * math.pi)), 4)
            amplitude = round(float(rng.uniform(2.0, 4.0)), 3)
            variation.append(((kx, ky, kz), phase, amplitude))

        organ_axes = tuple(float(v) for v in rng.uniform(25.0, 40.0, size=3))
        organ_centre = _place_inside(rng, organ_axes, body, _ORGAN_MARGIN, _ORGAN_EXTENT_LIMIT_MM)
        organ = Ellipsoid(_round3(organ_centre), _round3(organ_axes))
        organ_hu = float(rng.uniform(110.0, 150.0))

        lesion: Ellipsoid | None = None
        lesion_hu: float | None = None
        # Draw unconditionally so the stream position does not depend on the outcome.
        has_lesion = bool(rng.uniform() < _LESION_PROBABILITY)
        radius = float(rng.uniform(12.0, 18.0))
        lesion_hu_draw = float(rng.uniform(30.0, 50.0))
        if has_lesion:
            lesion_centre = _place_inside(rng, (radius,) * 3, organ, _LESION_MARGIN, None)
            lesion = Ellipsoid(_round3(lesion_centre), _round3((radius,) * 3))
            lesion_hu = lesion_hu_draw
        return cls(
            body=body,
            body_hu=round(body_hu, 3),
            body_variation=tuple(variation),
            organ=organ,
            organ_hu=round(organ_hu, 3),
            lesion=lesion,
            lesion_hu=None if lesion_hu is None else round(lesion_hu, 3),
        )

    @property
    def has_lesion(self) -> bool:
        """Whether the phantom has a lesion."""
        return self.lesion is not None

    def sample(self, points_lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Evaluate the phantom at points.

        Args:
            points_lps: ``(N, 3)`` LPS coordinates in mm.

        Returns:
            ``(hu, label)``: float32 ``(N,)`` noise-free Hounsfield units and
            uint8 ``(N,)`` labels (0 background including body, 1 organ,
            2 lesion; the lesion overrides the organ).

        Raises:
            ValueError: if ``points_lps`` is not an ``(N, 3)`` array.
        """
        points = np.asarray(points_lps, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(
                f"Phantom.sample expects points of shape (N, 3) in LPS mm, got shape "
                f"{points.shape}; reshape with points.reshape(-1, 3)"
            )
        # Column-major view: free when the caller built the points as (3, N).
        x, y, z = np.ascontiguousarray(points.T)
        hu = np.full(points.shape[0], AIR_HU, dtype=np.float64)
        label = np.zeros(points.shape[0], dtype=np.uint8)

        # Nested structures are only tested on the points of their parent,
        # which keeps the cost dominated by the single body test.
        body_idx = np.flatnonzero(self.body._radius_sq_xyz(x, y, z) <= 1.0)
        bx, by, bz = x[body_idx], y[body_idx], z[body_idx]
        tissue = np.full(body_idx.shape[0], self.body_hu)
        for (kx, ky, kz), phase, amplitude in self.body_variation:
            tissue += amplitude * np.cos(kx * bx + ky * by + kz * bz + phase)
        hu[body_idx] = tissue

        in_organ = self.organ._radius_sq_xyz(bx, by, bz) <= 1.0
        organ_idx = body_idx[in_organ]
        hu[organ_idx] = self.organ_hu
        label[organ_idx] = 1
        if self.lesion is not None and self.lesion_hu is not None:
            ox, oy, oz = bx[in_organ], by[in_organ], bz[in_organ]
            lesion_idx = organ_idx[self.lesion._radius_sq_xyz(ox, oy, oz) <= 1.0]
            hu[lesion_idx] = self.lesion_hu
            label[lesion_idx] = 2
        return hu.astype(np.float32), label

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description, including the analytic volumes."""
        organ_volume = self.organ.volume_mm3
        lesion_volume = self.lesion.volume_mm3 if self.lesion is not None else 0.0
        return {
            "air_hu": AIR_HU,
            "body": {
                **self.body.to_dict(),
                "hu": self.body_hu,
                "variation": [
                    {"k_rad_per_mm": list(k), "phase_rad": phase, "amplitude_hu": amplitude}
                    for k, phase, amplitude in self.body_variation
                ],
            },
            "organ": {
                **self.organ.to_dict(),
                "hu": self.organ_hu,
                "volume_mm3": round(organ_volume, 3),
                # The lesion overrides the organ, so label 1 covers only the rest.
                "label_volume_mm3": round(organ_volume - lesion_volume, 3),
            },
            "lesion": None
            if self.lesion is None
            else {
                **self.lesion.to_dict(),
                "radius_mm": self.lesion.semi_axes[0],
                "hu": self.lesion_hu,
                "volume_mm3": round(lesion_volume, 3),
                "label_volume_mm3": round(lesion_volume, 3),
            },
        }


def _round3(values: tuple[float, ...] | np.ndarray) -> tuple[float, float, float]:
    # Rounded parameters keep ground_truth.json short and exactly reproducible.
    x, y, z = (round(float(v), 3) for v in values)
    return (x, y, z)


def _surface_directions(n: int = 400) -> np.ndarray:
    """Quasi-uniform unit vectors (Fibonacci sphere) for containment tests."""
    i = np.arange(n) + 0.5
    polar = np.arccos(1.0 - 2.0 * i / n)
    azimuth = math.pi * (1.0 + 5.0**0.5) * i
    return np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=1)


_DIRECTIONS = _surface_directions()


def _place_inside(
    rng: np.random.Generator,
    inner_axes: tuple[float, ...],
    outer: Ellipsoid,
    margin: float,
    extent_limit_mm: float | None,
) -> tuple[float, float, float]:
    """Draw a centre so an axis-aligned ellipsoid fits inside ``outer``.

    Containment is checked on 400 points of the inner surface against
    ``outer`` shrunk by ``margin``; the margin covers the gaps between the
    test points by a wide safety factor.
    """
    outer_centre = np.asarray(outer.centre)
    outer_axes = np.asarray(outer.semi_axes)
    inner = np.asarray(inner_axes)
    shrunk_axes = outer_axes * margin
    shrunk = Ellipsoid(outer.centre, (float(shrunk_axes[0]), float(shrunk_axes[1]), float(shrunk_axes[2])))
    max_offset = np.maximum(outer_axes * margin - inner, 0.0)
    for _ in range(500):
        centre = outer_centre + rng.uniform(-1.0, 1.0, size=3) * max_offset
        if extent_limit_mm is not None and np.any(np.abs(centre) + inner > extent_limit_mm):
            continue
        if np.all(shrunk.contains(centre + _DIRECTIONS * inner)):
            return (float(centre[0]), float(centre[1]), float(centre[2]))
    # Concentric placement always fits because every inner semi-axis is drawn
    # smaller than the matching outer semi-axis times the margin.
    return (float(outer_centre[0]), float(outer_centre[1]), float(outer_centre[2]))
