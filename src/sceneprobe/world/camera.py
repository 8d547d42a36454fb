"""The pinhole camera of a scene: its frame, its primary rays, and where a world point lands (:func:`project`).

Camera. A pinhole at ``o = (x, height, z)`` with unit axes ``right, up, forward`` (yaw about +y, pitch below the
horizon). Pixel ``(i, j)`` of a ``W × W`` image (row 0 at the top) looks along the ray ``o + t·d`` with::

    u = ((j + 0.5) / W · 2 − 1) · tan(fov / 2),   v = (1 − (i + 0.5) / W · 2) · tan(fov / 2)
    d = forward + u · right + v · up                      # d · forward = 1, so t *is* the camera-space depth z
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .scenes import SceneSpec

_DT = np.float32          # float32 halves memory traffic; depth is still exact to ~1e-6 relative


class Camera:
    """Pinhole camera of a spec: ``origin`` and unit ``right, up, forward`` (world frame), ``tan_half`` of the fov."""

    def __init__(self, spec: SceneSpec) -> None:
        yaw, pitch = math.radians(spec.camera_yaw), math.radians(spec.camera_pitch)
        self.origin = (spec.camera_position[0], spec.camera_height, spec.camera_position[1])
        self.forward = (math.sin(yaw) * math.cos(pitch), -math.sin(pitch), math.cos(yaw) * math.cos(pitch))
        self.right = (math.cos(yaw), 0.0, -math.sin(yaw))          # up_world × forward: left-handed frame
        f, r = self.forward, self.right
        self.up = _cross(f, r)                                      # forward × right
        self.tan_half = math.tan(math.radians(spec.fov_deg) / 2)

    def to_camera(self, point: Sequence[float]) -> tuple[float, float, float]:
        """World point → camera coordinates ``(X, Y, Z)`` (right, up, forward); ``Z`` is its depth."""
        rel = [p - o for p, o in zip(point, self.origin)]
        dot = lambda a: sum(x * y for x, y in zip(rel, a))  # noqa: E731
        return dot(self.right), dot(self.up), dot(self.forward)

    def rays(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Directions ``d`` (unit forward component) through the centres of an ``n × n`` grid; each ``(n, n)``."""
        s = (np.arange(n, dtype=np.float64) + 0.5) / n * 2 - 1       # (n,) in (-1, 1)
        u = (s * self.tan_half)[None, :]                              # (1, n) columns, left → right
        v = (-s * self.tan_half)[:, None]                             # (n, 1) rows, top → bottom
        return tuple((f + u * r + v * w).astype(_DT)                  # 3 × (n, n)
                     for f, r, w in zip(self.forward, self.right, self.up))


def project(spec: SceneSpec, point: Sequence[float], size: int = 64) -> tuple[float, float, float]:
    """Where a world point lands in a ``size × size`` render: ``(row, col, depth)``.

    ``row, col`` are continuous pixel coordinates (pixel ``(i, j)`` covers ``[i, i+1) × [j, j+1)``), so
    ``int(row), int(col)`` is the pixel that sees the point (if nothing is in front of it). A point behind the
    camera (depth <= 0) has ``row = col = nan``.
    """
    cam = Camera(spec)
    x, y, z = cam.to_camera(point)
    if z <= 0:
        return math.nan, math.nan, z
    u, v = x / z / cam.tan_half, y / z / cam.tan_half
    return (1 - v) / 2 * size, (u + 1) / 2 * size, z


def _cross(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    return a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]
