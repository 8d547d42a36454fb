"""The colour of every ray: textured albedo, Lambert light with shadows from the objects, fog and the sky gradient.

Shading (Lambert, one directional light ``l`` plus ambient ``a``)::

    colour = albedo · (a + (1 − a) · max(0, n · l) · lit),   lit = no object crosses the ray  p + s·l, s > 0

then a distance fog towards the horizon colour, ``f = 1 − exp(−(t / 30)²)``, so the ground fades into the sky and
the texture does not alias at the horizon. The sky is a gradient from ``sky_horizon`` to ``sky_top`` with elevation.
"""
from __future__ import annotations

import math

import numpy as np

from .camera import _DT, Camera, _cross
from .scenes import SceneSpec
from .shapes import _EPS, _Shape

_FOG = 30.0               # fog length scale (world units)


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
