"""Casting a grid of rays into the scene: the nearest hit of each ray (ground, an object or the sky), each object
tested only against the rays of its projected bounding box.
"""
from __future__ import annotations

import math

import numpy as np

from .camera import _DT, Camera
from .shapes import _Shape


def _screen_box(cam: Camera, shape: _Shape, n: int) -> tuple[slice, slice] | None:
    """Rows and columns of the ``n × n`` ray grid whose rays can meet the shape's bounding sphere (None: none).

    The planes through the eye that contain the camera's up axis and touch a sphere at camera coords (X, Y, Z),
    radius R, have slopes u = x/z solving (X − uZ)² = R²(1 + u²), i.e. u = (XZ ± R√(X² + Z² − R²)) / (Z² − R²);
    the same in Y gives the rows. Only this patch of rays is tested against the object, so an object costs what
    its screen area costs.
    """
    x, y, z = cam.to_camera(shape.c)
    r = shape.radius * 1.001 + 1e-6
    if z + r <= 0:
        return None                                                   # wholly behind the camera
    if z - r <= 1e-6 or x * x + z * z <= r * r or y * y + z * z <= r * r:
        return slice(0, n), slice(0, n)                               # straddles the eye plane: test every ray
    den = z * z - r * r

    def span(a: float) -> tuple[float, float]:
        root = r * math.sqrt(a * a + z * z - r * r)
        return (a * z - root) / den / cam.tan_half, (a * z + root) / den / cam.tan_half  # in units of tan_half

    (ulo, uhi), (vlo, vhi) = span(x), span(y)
    to_index = lambda s: (s + 1) / 2 * n - 0.5                       # noqa: E731  (grid coord of a ray centre)
    c0, c1 = math.floor(to_index(ulo)) - 1, math.ceil(to_index(uhi)) + 2
    r0, r1 = math.floor(to_index(-vhi)) - 1, math.ceil(to_index(-vlo)) + 2
    c0, c1, r0, r1 = max(c0, 0), min(c1, n), max(r0, 0), min(r1, n)
    if c0 >= c1 or r0 >= r1:
        return None
    return slice(r0, r1), slice(c0, c1)


# ------------------------------------------------------------------------------------------------------ casting
def _cast(cam: Camera, shapes: list[_Shape], d: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hit of every ray of an ``(n, n)`` grid: ``t`` (n, n) (inf = sky) and instance ids (n, n) uint8."""
    dx, dy, dz = d
    n = dx.shape[0]
    with np.errstate(divide="ignore"):
        t = np.where(dy < 0, -cam.origin[1] / dy, np.inf).astype(_DT)  # (n, n) ground plane y = 0
    ids = (dy < 0).astype(np.uint8)                                    # (n, n) 1 = ground, 0 = sky
    for shape in shapes:
        box = _screen_box(cam, shape, n)
        if box is None:
            continue
        ts = shape.hit(*cam.origin, dx[box], dy[box], dz[box])        # (h, w) patch
        closer = ts < t[box]
        t[box][closer] = ts[closer]                                   # t[box] is a view: writes go to t
        ids[box][closer] = shape.id
    return t, ids
