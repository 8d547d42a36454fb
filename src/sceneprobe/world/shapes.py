"""The scene's objects prepared for ray casting (:class:`_Shape`): closed-form ray intersections, surface normals and
the albedo of their textures.

Intersections are closed form: ground ``y = 0`` (``t = −o_y / d_y``), sphere (quadratic), box rotated about the
vertical axis (slab test in the box's frame), vertical cylinder and upright cone (quadratics plus caps). The nearest
``t > 0`` wins, which gives occlusion between objects for free.
"""
from __future__ import annotations

import math

import numpy as np

_EPS = 1e-4               # smallest accepted hit distance, and the offset of shadow-ray origins off a surface
_TEXTURE_DARK = 0.6       # albedo factor of the dark cells of an object's stripes/checker


class _Shape:
    """One object, prepared for ray casting: centre ``c``, half-extents ``s``, yaw, bounding-sphere radius.

    The object frame is the world frame translated to ``c`` and turned by ``yaw`` about +y; each kind's surface is
    simple there (axis-aligned box, vertical cylinder and cone). Scalars are Python floats so that float32 arrays
    stay float32 (NumPy 2 promotes on NumPy float64 scalars).
    """

    def __init__(self, obj: dict, k: int) -> None:
        self.kind: str = obj["kind"]
        self.id = 2 + k
        self.c = tuple(float(v) for v in obj["centre"])
        self.s = tuple(float(v) for v in obj["size"])
        yaw = math.radians(obj["yaw"])
        self.cos, self.sin = math.cos(yaw), math.sin(yaw)
        self.colour = tuple(float(v) for v in obj["colour"])
        self.texture: str = obj["texture"]
        sx, sy, sz = self.s
        # bounding sphere about c: a box's corner; a cylinder's or cone's base rim (sz = sx is its radius)
        self.radius = {"sphere": sx, "box": math.sqrt(sx * sx + sy * sy + sz * sz)}.get(self.kind, math.hypot(sx, sy))

    # frames ---------------------------------------------------------------------------------------------------
    def local(self, x, y, z):
        """World points → object frame (translate, then undo the yaw)."""
        px, py, pz = x - self.c[0], y - self.c[1], z - self.c[2]
        return self.cos * px - self.sin * pz, py, self.sin * px + self.cos * pz

    def local_dir(self, x, y, z):
        return self.cos * x - self.sin * z, y, self.sin * x + self.cos * z

    def world_dir(self, x, y, z):
        return self.cos * x + self.sin * z, y, -self.sin * x + self.cos * z

    # intersection: nearest t > _EPS along o + t·d, np.inf where the ray misses ------------------------------------
    def hit(self, ox, oy, oz, dx, dy, dz) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return getattr(self, "_hit_" + self.kind)(ox, oy, oz, dx, dy, dz)

    def _hit_sphere(self, ox, oy, oz, dx, dy, dz):
        ox, oy, oz = ox - self.c[0], oy - self.c[1], oz - self.c[2]
        a = dx * dx + dy * dy + dz * dz
        b = dx * ox + dy * oy + dz * oz
        c = ox * ox + oy * oy + oz * oz - self.s[0] ** 2
        disc = b * b - a * c                                           # quarter discriminant of a t² + 2b t + c
        t = (-b - np.sqrt(np.maximum(disc, 0))) / a                    # near root: origins are outside the sphere
        return np.where((disc >= 0) & (t > _EPS), t, np.inf)

    def _hit_box(self, ox, oy, oz, dx, dy, dz):
        o = self.local(ox, oy, oz)
        d = self.local_dir(dx, dy, dz)
        near, far = -np.inf, np.inf
        for oa, da, sa in zip(o, d, self.s):                           # slab test, one axis at a time
            inv = 1.0 / da                                             # ±inf for rays parallel to the slab
            t1, t2 = (-sa - oa) * inv, (sa - oa) * inv
            near = np.maximum(near, np.minimum(t1, t2))
            far = np.minimum(far, np.maximum(t1, t2))
        return np.where((near <= far) & (near > _EPS), near, np.inf)

    def _caps(self, best, ox, oy, oz, dx, dy, dz, levels, radius_at):
        """Flat discs at local heights ``levels``, with radius ``radius_at(level)``."""
        for level in levels:
            t = (level - oy) / dy
            x, z = ox + t * dx, oz + t * dz
            ok = (t > _EPS) & (x * x + z * z <= radius_at(level) ** 2)
            best = np.where(ok & (t < best), t, best)
        return best

    def _hit_cylinder(self, ox, oy, oz, dx, dy, dz):
        r, h = self.s[0], self.s[1]
        ox, oy, oz = ox - self.c[0], oy - self.c[1], oz - self.c[2]   # yaw does not change a vertical cylinder
        a = dx * dx + dz * dz
        b = dx * ox + dz * oz
        disc = b * b - a * (ox * ox + oz * oz - r * r)
        t = (-b - np.sqrt(np.maximum(disc, 0))) / a
        y = oy + t * dy
        best = np.where((disc >= 0) & (t > _EPS) & (np.abs(y) <= h), t, np.inf)
        return self._caps(best, ox, oy, oz, dx, dy, dz, (h, -h), lambda level: r)

    def _hit_cone(self, ox, oy, oz, dx, dy, dz):
        # Side: x² + z² = k² (h − y)², k = r / 2h, for −h ≤ y ≤ h (apex at y = h, base of radius r at y = −h).
        r, h = self.s[0], self.s[1]
        k2 = (r / (2 * h)) ** 2
        ox, oy, oz = ox - self.c[0], oy - self.c[1], oz - self.c[2]
        w = h - oy
        a = dx * dx + dz * dz - k2 * dy * dy
        b = dx * ox + dz * oz + k2 * w * dy
        disc = b * b - a * (ox * ox + oz * oz - k2 * w * w)
        sq = np.sqrt(np.maximum(disc, 0))
        best = np.inf
        for t in ((-b - sq) / a, (-b + sq) / a):                       # a may be < 0: check both roots
            y = oy + t * dy
            best = np.where((disc >= 0) & (t > _EPS) & (y >= -h) & (y <= h) & (t < best), t, best)
        return self._caps(best, ox, oy, oz, dx, dy, dz, (-h,), lambda level: r)

    # surface normal (world, unit) and albedo at hit points -------------------------------------------------------
    def normal(self, x, y, z):
        lx, ly, lz = self.local(x, y, z)
        sx, sy, sz = self.s
        if self.kind == "sphere":
            n = (lx, ly, lz)
        elif self.kind == "box":
            qx, qy, qz = np.abs(lx) / sx, np.abs(ly) / sy, np.abs(lz) / sz   # the face hit has |q| = 1, the largest
            mx = (qx >= qy) & (qx >= qz)
            my = ~mx & (qy >= qz)
            mz = ~mx & ~my
            n = (np.where(mx, np.sign(lx), 0.0), np.where(my, np.sign(ly), 0.0), np.where(mz, np.sign(lz), 0.0))
        else:
            rho = np.sqrt(lx * lx + lz * lz)
            if self.kind == "cylinder":
                side = (sy - np.abs(ly)) / sy > (sx - rho) / sx       # nearer to the curved side than to a cap
                n = (np.where(side, lx, 0.0), np.where(side, 0.0, np.sign(ly)), np.where(side, lz, 0.0))
            else:
                k = sx / (2 * sy)
                side = (ly + sy) / sy > (k * (sy - ly) - rho) / sx    # above the base disc rather than on it
                # gradient of x² + z² − k²(h − y)²  ∝  (x, k²(h − y), z)
                n = (np.where(side, lx, 0.0), np.where(side, k * k * (sy - ly), -1.0), np.where(side, lz, 0.0))
        nx, ny, nz = self.world_dir(*n)
        norm = np.sqrt(nx * nx + ny * ny + nz * nz)
        norm = np.where(norm > 0, norm, 1.0)
        return nx / norm, ny / norm, nz / norm

    def albedo_factor(self, x, y, z) -> np.ndarray | float:
        """1 on light cells, ``_TEXTURE_DARK`` on dark ones: 4 horizontal stripes, or a 3-D checker of ~3 cells."""
        if self.texture == "plain":
            return 1.0
        lx, ly, lz = self.local(x, y, z)
        if self.texture == "stripes":
            odd = np.floor((ly + self.s[1]) / (2 * self.s[1]) * 4) % 2
        else:
            k = 1.5 / max(self.s)
            odd = (np.floor(lx * k) + np.floor(ly * k) + np.floor(lz * k)) % 2
        return 1.0 - (1.0 - _TEXTURE_DARK) * odd
