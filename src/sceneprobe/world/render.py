"""Render a :class:`~sceneprobe.world.scenes.SceneSpec` by analytic ray casting (vectorised numpy, no GPU, no mesh).

Camera. A pinhole at ``o = (x, height, z)`` with unit axes ``right, up, forward`` (yaw about +y, pitch below the
horizon). Pixel ``(i, j)`` of a ``W × W`` image (row 0 at the top) looks along the ray ``o + t·d`` with::

    u = ((j + 0.5) / W · 2 − 1) · tan(fov / 2),   v = (1 − (i + 0.5) / W · 2) · tan(fov / 2)
    d = forward + u · right + v · up                      # d · forward = 1, so t *is* the camera-space depth z

Intersections are closed form: ground ``y = 0`` (``t = −o_y / d_y``), sphere (quadratic), box rotated about the
vertical axis (slab test in the box's frame), vertical cylinder and upright cone (quadratics plus caps). The nearest
``t > 0`` wins, which gives occlusion between objects for free.

Shading (Lambert, one directional light ``l`` plus ambient ``a``)::

    colour = albedo · (a + (1 − a) · max(0, n · l) · lit),   lit = no object crosses the ray  p + s·l, s > 0

then a distance fog towards the horizon colour, ``f = 1 − exp(−(t / 30)²)``, so the ground fades into the sky and
the texture does not alias at the horizon. The sky is a gradient from ``sky_horizon`` to ``sky_top`` with elevation.

Outputs (``render``): ``rgb`` is the mean of ``s × s`` rays per pixel (anti-aliased); ``depth``, ``instances`` and
``saliency`` come from the pixel-centre ray alone (for odd ``s`` that is the middle sub-ray, so it costs nothing),
so labels are exact, never blended across an edge.

* ``depth`` (float32): camera-space ``z`` (distance along the optical axis, not along the ray), clipped to
  :data:`FAR_DEPTH`; sky pixels are ``FAR_DEPTH``.
* ``instances`` (uint8): 0 = sky, 1 = ground, ``2 + k`` = object ``k`` of ``spec.objects``.
* ``saliency`` (bool): ``instances >= 2`` — every object is salient; ground and sky are not.
"""
from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import fail
from .scenes import SceneSpec, sample_scene

FAR_DEPTH: float = 20.0
"""Depth of sky pixels, and the clip for the ground far away (objects sit 3–10 units from the camera)."""

SALIENCY_RULE = "saliency = instances >= 2: pixels of any object are salient; ground (1) and sky (0) are not"
MIN_SIZE, MAX_SIZE = 32, 512
MAX_SUPERSAMPLE = 8

_DT = np.float32          # float32 halves memory traffic; depth is still exact to ~1e-6 relative
_EPS = 1e-4               # smallest accepted hit distance, and the offset of shadow-ray origins off a surface
_FOG = 30.0               # fog length scale (world units)
_TEXTURE_DARK = 0.6       # albedo factor of the dark cells of an object's stripes/checker


def check_render_args(size: int, supersample: int) -> None:
    """Refuse image sizes and supersampling factors the renderer does not support (a user error, not a bug)."""
    if not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise fail(f"image size {size!r} is not supported; choose --size between {MIN_SIZE} and {MAX_SIZE}")
    if not isinstance(supersample, (int, np.integer)) or not 1 <= supersample <= MAX_SUPERSAMPLE:
        raise fail(f"supersample {supersample!r} is not supported; choose --supersample between 1 and "
                   f"{MAX_SUPERSAMPLE} (rays per pixel = supersample²)")


# ----------------------------------------------------------------------------------------------------- camera
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


# ----------------------------------------------------------------------------------------------------- shapes
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


def _cross(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    return a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]


def _light_basis(light: tuple[float, float, float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Two unit vectors orthogonal to unit ``light`` (to measure distances from shadow rays in the plane ⟂ light)."""
    e1 = _cross(light, (1.0, 0.0, 0.0) if abs(light[0]) < 0.9 else (0.0, 0.0, 1.0))
    norm = math.sqrt(sum(v * v for v in e1))
    e1 = tuple(v / norm for v in e1)
    return e1, _cross(light, e1)


def _shadowed(shapes: list[_Shape], skip: int, p: tuple, n: tuple, light: tuple[float, float, float],
              mask: np.ndarray) -> np.ndarray:
    """Whether the ray ``p + ε·n + s·light`` (s > 0) meets a shape other than ``skip``, for points where ``mask``.

    ``p`` are arrays (M,), ``n`` arrays or scalars; returns (M,) bool (False where not ``mask``). A convex shape
    cannot shadow its own lit side, so ``skip`` (the shape the points lie on) is not tested: no self-shadow acne.
    Shapes are culled by bounding sphere first: a ray along ``light`` passes within R of a centre c iff the point's
    projection on the plane ⟂ light is within R of c's, and c is not behind the point (c·l > p·l − R).
    """
    px, py, pz = (pi + _EPS * ni for pi, ni in zip(p, n))
    out = np.zeros(px.shape, dtype=bool)
    others = [s for s in shapes if s.id != skip]
    if not others or not mask.any():
        return out
    e1, e2 = _light_basis(light)
    a = px * e1[0] + py * e1[1] + pz * e1[2]                          # (M,) coordinates in the plane ⟂ light
    b = px * e2[0] + py * e2[1] + pz * e2[2]
    s = px * light[0] + py * light[1] + pz * light[2]                 # (M,) position along the light
    lx, ly, lz = (np.float64(v) for v in light)
    for shape in others:
        c, r = shape.c, shape.radius
        ca, cb = sum(ci * ei for ci, ei in zip(c, e1)), sum(ci * ei for ci, ei in zip(c, e2))
        cl = sum(ci * li for ci, li in zip(c, light))
        cand = np.flatnonzero(mask & ((a - ca) ** 2 + (b - cb) ** 2 < r * r) & (s < cl + r))
        if cand.size:
            out[cand] |= np.isfinite(shape.hit(px[cand], py[cand], pz[cand], lx, ly, lz))
    return out


def _ground_shadowed(shapes: list[_Shape], px: np.ndarray, pz: np.ndarray, mask: np.ndarray,
                     light: tuple[float, float, float]) -> np.ndarray:
    """Whether ground points (x, 0, z) where ``mask`` are in an object's shadow; (M,) bool.

    Culling for the ground is cheaper than :func:`_shadowed`'s: a bounding sphere (c, R) casts along the unit light
    l a shadow on y = 0 that is an ellipse centred at c − (c_y / l_y)·l with semi-axes R and R / l_y, so only
    points in the square of half-side R / l_y around that centre are tested exactly.
    """
    out = np.zeros(px.shape, dtype=bool)
    lx, ly, lz = (np.float64(v) for v in light)
    for shape in shapes:
        (cx, cy, cz), half = shape.c, shape.radius / light[1]
        gx, gz = cx - cy / light[1] * light[0], cz - cy / light[1] * light[2]
        cand = np.flatnonzero(mask & (np.abs(px - gx) <= half) & (np.abs(pz - gz) <= half))
        if cand.size:
            x, z = px[cand], pz[cand]
            out[cand] |= np.isfinite(shape.hit(x, np.full_like(x, _EPS), z, lx, ly, lz))
    return out


def _parity(x: np.ndarray) -> np.ndarray:
    """``floor(x) mod 2`` as 0.0 / 1.0 (float ``%`` is ~10× slower than this)."""
    h = np.floor(x) * 0.5
    return (h - np.floor(h)) * 2


def _ground_weight(spec: SceneSpec, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Texture weight in [0, 1] at ground points (x, 0, z), any shape: colour = c0 + (c1 − c0)·w.

    Texture coordinates are world x, z turned by ``ground_angle`` and divided by ``ground_scale``.
    """
    th = math.radians(spec.ground_angle)
    k = 1.0 / spec.ground_scale
    gx = (x * math.cos(th) + z * math.sin(th)) * k
    gz = (z * math.cos(th) - x * math.sin(th)) * k
    if spec.ground_kind == "checker":
        return _parity(np.floor(gx) + np.floor(gz))
    if spec.ground_kind == "stripes":
        return _parity(gx)
    # "noise": four plane waves with random directions, 0.5–1.4 cycles per period and random phases (from
    # ground_seed): smooth, aperiodic-looking blotches; a sum of 4 unit sines has std √2, so 0.35× maps it to ~[0, 1].
    rng = np.random.default_rng(spec.ground_seed)
    ang, freq, phase = rng.uniform(0, np.pi, 4), rng.uniform(0.5, 1.4, 4), rng.uniform(0, 2 * np.pi, 4)
    acc = np.zeros_like(gx)
    for a, f, ph in zip(ang, freq, phase):
        acc += np.sin((gx * float(np.cos(a)) + gz * float(np.sin(a))) * float(2 * np.pi * f) + float(ph))
    return np.clip(acc * 0.35 + 0.5, 0.0, 1.0)


def _shade(spec: SceneSpec, cam: Camera, shapes: list[_Shape], d: tuple[np.ndarray, ...], t: np.ndarray,
           ids: np.ndarray) -> list[np.ndarray]:
    """Colour of every ray of the grid, as three planes R, G, B, each (n, n) float in [0, 1].

    Work is done on whole planes (cheap elementwise ops) rather than gathering pixel subsets: on 64×64×9 rays a
    fancy-indexed gather/scatter of (M, 3) rows costs more than the arithmetic it saves. Objects, which cover
    little of the image, are the exception: their pixels are gathered as 1-D index lists.
    """
    dx, dy, dz = d
    norm = math.sqrt(sum(v * v for v in spec.light_dir))
    light = tuple(v / norm for v in spec.light_dir)
    amb = spec.ambient
    sky, ground = ids == 0, ids == 1                                    # (n, n) masks
    ts = np.where(sky, np.float32(0), t)                                # (n, n) finite t (sky → 0)
    px, pz = cam.origin[0] + ts * dx, cam.origin[2] + ts * dz           # (n, n) hit points (y: objects only)

    # Ground (and, provisionally, everything): textured albedo, Lambert term l_y, shadows from the objects.
    w = _ground_weight(spec, px, pz)                                    # (n, n)
    albedo = [np.float32(c0) + np.float32(c1 - c0) * w for c0, c1 in zip(*spec.ground_colours)]  # 3 × (n, n)
    lam = np.full(t.shape, max(light[1], 0.0), dtype=_DT)               # (n, n)
    if light[1] > 0 and shapes:
        lam.ravel()[_ground_shadowed(shapes, px.ravel(), pz.ravel(), ground.ravel(), light)] = 0.0

    # Objects: gather their pixels, compute normals, texture, Lambert term and shadows cast by the others.
    for shape in shapes:
        idx = np.flatnonzero(ids.ravel() == shape.id)                   # (M,)
        if not idx.size:
            continue
        p = (px.ravel()[idx], cam.origin[1] + ts.ravel()[idx] * dy.ravel()[idx], pz.ravel()[idx])  # 3 × (M,)
        nrm = shape.normal(*p)
        li = np.maximum(nrm[0] * light[0] + nrm[1] * light[1] + nrm[2] * light[2], 0).astype(_DT)
        li[_shadowed(shapes, shape.id, p, nrm, light, li > 0)] = 0.0
        lam.ravel()[idx] = li
        factor = shape.albedo_factor(*p)
        for plane, c in zip(albedo, shape.colour):
            plane.ravel()[idx] = c * factor

    # Light, fog toward the horizon colour, sky gradient.
    fog = 1 - np.exp(-(ts * np.float32(1 / _FOG)) ** 2)                # (n, n), 0 for the sky
    light_f = (amb + (1 - amb) * lam) * (1 - fog)                      # (n, n)
    n = t.shape[0]
    s = ((np.arange(n, dtype=_DT) + 0.5) / n * 2 - 1) * np.float32(cam.tan_half)   # (n,) u (columns), −v (rows)
    inv_len = 1 / np.sqrt(1 + s[:, None] ** 2 + s[None, :] ** 2)        # (n, n) 1/|d|: |d|² = 1 + u² + v²
    elev = dy * inv_len                                                 # (n, n) sine of the ray's elevation
    sky_w = np.sqrt(np.clip(elev, 0, 1))
    planes = []
    for a, hor, top in zip(albedo, spec.sky_horizon, spec.sky_top):
        lit = a * light_f + np.float32(hor) * fog
        planes.append(np.where(sky, np.float32(hor) + np.float32(top - hor) * sky_w, lit))
    return planes


def _box_filter(plane: np.ndarray, s: int) -> np.ndarray:
    """Mean over s × s blocks: (n, n) → (n/s, n/s). Strided adds beat ``reshape(...).mean(axis=(1, 3))`` 10×."""
    rows = plane[0::s].copy()                                          # (n/s, n)
    for i in range(1, s):
        rows += plane[i::s]
    out = rows[:, 0::s].copy()                                         # (n/s, n/s)
    for j in range(1, s):
        out += rows[:, j::s]
    return out * np.float32(1 / (s * s))


def render(spec: SceneSpec, size: int = 64, supersample: int = 3) -> dict[str, np.ndarray]:
    """Render one scene.

    Returns ``rgb`` (H, W, 3) uint8 (mean of ``supersample²`` rays per pixel), ``depth`` (H, W) float32 camera-space
    z clipped to ``FAR_DEPTH`` (sky = ``FAR_DEPTH``), ``instances`` (H, W) uint8 (0 sky, 1 ground, 2 + k object k)
    and ``saliency`` (H, W) bool (= ``instances >= 2``); labels come from the pixel-centre ray only.
    """
    check_render_args(size, supersample)
    if isinstance(spec, dict):
        spec = SceneSpec.from_dict(spec)
    cam = Camera(spec)
    shapes = [_Shape(o, k) for k, o in enumerate(spec.objects)]
    n, s = size * supersample, supersample
    d = cam.rays(n)                                                    # 3 × (n, n)
    t, ids = _cast(cam, shapes, d)                                     # (n, n), (n, n)
    planes = _shade(spec, cam, shapes, d, t, ids)                      # 3 × (n, n)
    rgb = np.stack([_box_filter(p, s) for p in planes], axis=-1)       # (H, W, 3)
    rgb = (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)
    if s % 2 == 1:
        tc, ic = t[s // 2::s, s // 2::s], ids[s // 2::s, s // 2::s]     # the middle sub-ray is the pixel centre
    else:
        tc, ic = _cast(cam, shapes, cam.rays(size))
    depth = np.minimum(tc, FAR_DEPTH).astype(np.float32)              # (H, W); sky (inf) → FAR_DEPTH
    ic = np.ascontiguousarray(ic)
    return {"rgb": rgb, "depth": np.ascontiguousarray(depth), "saliency": ic >= 2, "instances": ic}


# ------------------------------------------------------------------------------------------------ many scenes
def chunked(items: Sequence[Any], workers: int, max_chunk: int = 256) -> list[list[Any]]:
    """Split ``items`` in order into chunks: ~8 per worker so the pool stays busy, at most ``max_chunk`` each."""
    size = max(1, min(max_chunk, math.ceil(len(items) / (8 * max(workers, 1)))))
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def map_chunks(fn: Callable[[Any], Any], jobs: list[Any], workers: int = 1, progress: bool = False,
               counts: Iterable[int] | None = None, desc: str = "scenes") -> list[Any]:
    """``[fn(job) for job in jobs]``, in order, over a pool of ``workers`` spawned processes when ``workers > 1``.

    ``spawn`` (not fork) because the parent may hold torch's threads; ``fn`` must be a module-level function.
    ``counts`` (items per job) drives the progress bar.
    """
    from tqdm.auto import tqdm

    counts = list(counts) if counts is not None else [1] * len(jobs)
    bar = tqdm(total=sum(counts), unit="scene", desc=desc, disable=not progress)
    try:
        if workers <= 1 or len(jobs) <= 1:
            out = []
            for job, c in zip(jobs, counts):
                out.append(fn(job))
                bar.update(c)
            return out
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
            out = []
            for res, c in zip(pool.map(fn, jobs), counts):
                out.append(res)
                bar.update(c)
            return out
    finally:
        bar.close()


def _render_chunk(job: tuple[int, list[int], int, int]) -> dict:
    seed, indices, size, supersample = job
    specs = [sample_scene(seed, i) for i in indices]
    outs = [render(sp, size, supersample) for sp in specs]
    return {**{k: np.stack([o[k] for o in outs]) for k in ("rgb", "depth", "saliency", "instances")},
            "specs": specs}


def stack_chunks(parts: list[dict], size: int) -> dict:
    """Concatenate per-chunk outputs of :func:`_render_chunk` (keys they have); no chunks gives (0, …) arrays."""
    if not parts:
        return {"rgb": np.zeros((0, size, size, 3), np.uint8), "depth": np.zeros((0, size, size), np.float32),
                "saliency": np.zeros((0, size, size), bool), "instances": np.zeros((0, size, size), np.uint8),
                "specs": []}
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("rgb", "depth", "saliency", "instances")
           if k in parts[0]}
    out["specs"] = [s for p in parts for s in p["specs"]]
    return out


def render_scenes(seed: int, indices: Iterable[int], size: int = 64, supersample: int = 3, workers: int = 1,
                  progress: bool = False) -> dict:
    """Sample and render scenes ``indices`` of world ``seed``: stacked ``rgb`` (N, H, W, 3), ``depth`` (N, H, W),
    ``saliency`` (N, H, W), ``instances`` (N, H, W), and ``specs`` (list of N SceneSpec).

    Each scene depends only on ``(seed, index)``, so the result is byte-identical whatever ``workers`` is and
    however the indices are split into calls.
    """
    check_render_args(size, supersample)
    if not isinstance(workers, (int, np.integer)) or workers < 1:
        raise fail(f"workers must be a whole number >= 1, got {workers!r}")
    indices = [int(i) for i in indices]
    chunks = chunked(indices, workers)
    parts = map_chunks(_render_chunk, [(int(seed), c, size, supersample) for c in chunks], workers, progress,
                       counts=[len(c) for c in chunks], desc="render")
    return stack_chunks(parts, size)
