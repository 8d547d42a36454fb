"""Random scene specifications: what is in a scene, never how it looks on screen (that is ``render.py``).

World frame (left-handed, as in Unity): ``x`` to the right and ``z`` forward when the camera's yaw is 0, ``y`` up;
the ground is the plane ``y = 0``. Lengths are in world units; angles are in degrees.

A scene is a :class:`SceneSpec`: a pinhole camera, one directional light plus ambient light, a sky gradient, a
textured ground plane and 1–4 objects. Each object is a dict::

    {"kind": "sphere" | "box" | "cylinder" | "cone",
     "centre": (x, y, z),       # centre of the object's bounding box (world units)
     "size": (sx, sy, sz),      # half-extents of that box in the object's own frame:
                                #   sphere: sx = sy = sz = radius
                                #   box: half width, half height, half depth
                                #   cylinder: sx = sz = radius, sy = half height
                                #   cone (upright, apex up): sx = sz = base radius, sy = half height
     "yaw": float,              # rotation about the vertical axis, degrees (turns a box; turns the texture of all)
     "colour": (r, g, b),       # albedo in [0, 1]
     "texture": "plain" | "stripes" | "checker"}

An object *rests on the ground* when ``centre[1] == size[1]``; :func:`sample_scene` always does that, a hand-built
spec may float objects (the renderer does not care).

:func:`sample_scene` is a pure function of ``(seed, index)``: it draws from ``np.random.default_rng([seed, index])``,
so scene ``i`` is the same whatever else is generated, and a bigger dataset with the same seed contains the smaller.
Numbers are rounded to 4 decimals when sampled, so a spec survives a JSON round trip exactly.
"""
from __future__ import annotations

import colorsys
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import fail

OBJECT_KINDS = ("sphere", "box", "cylinder", "cone")
OBJECT_TEXTURES = ("plain", "stripes", "checker")
GROUND_KINDS = ("checker", "stripes", "noise")
_OBJECT_KEYS = ("kind", "centre", "size", "yaw", "colour", "texture")

# Where sampled objects may sit: camera-space distance of the object's centre (FAR_DEPTH in render.py is 20).
MIN_DISTANCE, MAX_DISTANCE = 3.0, 10.0
MAX_OBJECTS = 4


def _vec(value: Any, n: int, what: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise fail(f"scene spec: {what} must be {n} numbers, got {value!r}") from None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise fail(f"scene spec: {what} must be {n} finite numbers, got {value!r}")
    return out


def _object(obj: Any, k: int) -> dict:
    """Validate one object dict and return it with tuples of floats (so specs compare and hash-print stably)."""
    if not isinstance(obj, dict):
        raise fail(f"scene spec: object {k} must be a dict with keys {', '.join(_OBJECT_KEYS)}, got {obj!r}")
    unknown = set(obj) - set(_OBJECT_KEYS)
    missing = {"kind", "centre", "size"} - set(obj)
    if unknown or missing:
        raise fail(f"scene spec: object {k} has unknown keys {sorted(unknown)} / lacks {sorted(missing)}; "
                   f"allowed keys are {', '.join(_OBJECT_KEYS)}")
    kind = obj["kind"]
    if kind not in OBJECT_KINDS:
        raise fail(f"scene spec: object {k} has kind {kind!r}; use one of {', '.join(OBJECT_KINDS)}")
    size = _vec(obj["size"], 3, f"object {k} size")
    if min(size) <= 0:
        raise fail(f"scene spec: object {k} size {size} must be positive half-extents")
    if kind == "sphere" and not (size[0] == size[1] == size[2]):
        raise fail(f"scene spec: object {k} is a sphere, so its size must be (r, r, r), got {size}")
    if kind in ("cylinder", "cone") and size[0] != size[2]:
        raise fail(f"scene spec: object {k} is a {kind}, so size[0] and size[2] (the radius) must be equal, got {size}")
    texture = obj.get("texture", "plain")
    if texture not in OBJECT_TEXTURES:
        raise fail(f"scene spec: object {k} has texture {texture!r}; use one of {', '.join(OBJECT_TEXTURES)}")
    colour = _vec(obj.get("colour", (0.8, 0.2, 0.2)), 3, f"object {k} colour")
    return {"kind": kind, "centre": _vec(obj["centre"], 3, f"object {k} centre"), "size": size,
            "yaw": float(obj.get("yaw", 0.0)), "colour": colour, "texture": texture}


@dataclass(frozen=True)
class SceneSpec:
    """Everything needed to render one scene; the defaults make a plausible scene with no objects.

    Parameters:
        camera_position (`tuple[float, float]`): ``(x, z)`` of the ground point under the camera.
        camera_height (`float`): camera height above the ground (``y``), must be > 0.
        camera_pitch (`float`): tilt of the optical axis below the horizon, degrees (positive looks down).
        camera_yaw (`float`): heading, degrees; 0 looks along ``+z``, 90 along ``+x``.
        fov_deg (`float`): full field of view of the (square) image, degrees, in (1, 170).
        light_dir (`tuple[float, float, float]`): direction *towards* the light (any length; the renderer normalises).
        ambient (`float`): ambient fraction in [0, 1]; shade = ambient + (1 - ambient) * max(0, n·l) * lit.
        sky_top, sky_horizon (`tuple[float, float, float]`): sky gradient colours, zenith and horizon.
        ground_kind (`str`): ground texture, one of ``checker``, ``stripes``, ``noise``.
        ground_colours (`tuple[rgb, rgb]`): the texture's two colours.
        ground_scale (`float`): texture period in world units (checker square side, stripe width, noise wavelength).
        ground_angle (`float`): rotation of the texture about the vertical axis, degrees.
        ground_seed (`int`): seed of the ``noise`` texture's random phases.
        objects (`tuple[dict, ...]`): the objects, see the module docstring; object ``k`` has instance id ``2 + k``.
    """
    camera_position: tuple[float, float] = (0.0, 0.0)
    camera_height: float = 1.5
    camera_pitch: float = 10.0
    camera_yaw: float = 0.0
    fov_deg: float = 50.0
    light_dir: tuple[float, float, float] = (0.3, 0.8, -0.5)
    ambient: float = 0.35
    sky_top: tuple[float, float, float] = (0.30, 0.50, 0.85)
    sky_horizon: tuple[float, float, float] = (0.82, 0.87, 0.92)
    ground_kind: str = "checker"
    ground_colours: tuple[tuple[float, float, float], tuple[float, float, float]] = ((0.42, 0.42, 0.38),
                                                                                     (0.62, 0.62, 0.56))
    ground_scale: float = 1.0
    ground_angle: float = 0.0
    ground_seed: int = 0
    objects: tuple[dict, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        # Normalise containers (lists from JSON become tuples) and validate: a spec that exists can be rendered.
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen dataclass)
        put("camera_position", _vec(self.camera_position, 2, "camera_position"))
        for name in ("camera_height", "camera_pitch", "camera_yaw", "fov_deg", "ambient", "ground_scale",
                     "ground_angle"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise fail(f"scene spec: {name} must be a finite number, got {value!r}")
            put(name, float(value))
        if self.camera_height <= 0:
            raise fail(f"scene spec: camera_height must be > 0 (above the ground), got {self.camera_height}")
        if not 1.0 < self.fov_deg < 170.0:
            raise fail(f"scene spec: fov_deg must be in (1, 170), got {self.fov_deg}")
        if not 0.0 <= self.ambient <= 1.0:
            raise fail(f"scene spec: ambient must be in [0, 1], got {self.ambient}")
        if self.ground_scale <= 0:
            raise fail(f"scene spec: ground_scale must be > 0, got {self.ground_scale}")
        # Kept as given (normalised by the renderer) so that a JSON round trip is bit-exact.
        put("light_dir", _vec(self.light_dir, 3, "light_dir"))
        if not any(self.light_dir):
            raise fail("scene spec: light_dir must not be the zero vector")
        put("sky_top", _vec(self.sky_top, 3, "sky_top"))
        put("sky_horizon", _vec(self.sky_horizon, 3, "sky_horizon"))
        if self.ground_kind not in GROUND_KINDS:
            raise fail(f"scene spec: ground_kind {self.ground_kind!r} is not one of {', '.join(GROUND_KINDS)}")
        colours = tuple(self.ground_colours)
        if len(colours) != 2:
            raise fail(f"scene spec: ground_colours must be two RGB colours, got {self.ground_colours!r}")
        put("ground_colours", tuple(_vec(c, 3, "ground colour") for c in colours))
        put("ground_seed", int(self.ground_seed))
        if isinstance(self.objects, dict) or isinstance(self.objects, (str, bytes)):
            raise fail("scene spec: objects must be a list of object dicts")
        if len(self.objects) > 250:
            raise fail(f"scene spec: at most 250 objects fit in uint8 instance ids, got {len(self.objects)}")
        put("objects", tuple(_object(o, k) for k, o in enumerate(self.objects)))

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (tuples become lists in JSON); ``from_dict(to_dict())`` gives an equal spec."""
        d = dataclasses.asdict(self)
        d["objects"] = [dict(o) for o in self.objects]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SceneSpec":
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing keys take the defaults."""
        if not isinstance(d, dict):
            raise fail(f"scene spec must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise fail(f"scene spec has unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


def _r(x: float) -> float:
    return round(float(x), 4)


def _rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    return tuple(_r(c) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))  # type: ignore[return-value]


def _camera_axes(yaw: float, pitch: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(right, up, forward) unit vectors of a camera with the given yaw and pitch (degrees); see render.py."""
    y, p = math.radians(yaw), math.radians(pitch)
    forward = np.array([math.sin(y) * math.cos(p), -math.sin(p), math.cos(y) * math.cos(p)])
    right = np.array([math.cos(y), 0.0, -math.sin(y)])   # = up_world × forward, normalised (left-handed frame)
    up = np.cross(forward, right)
    return right, up, forward


def _sample_object(rng: np.random.Generator) -> dict:
    """One object standing on the ground, sized and coloured at random (position chosen by the caller)."""
    kind = str(rng.choice(OBJECT_KINDS))
    if kind == "sphere":
        r = rng.uniform(0.35, 1.0)
        size = (r, r, r)
    elif kind == "box":
        size = tuple(rng.uniform(0.3, 0.9, size=3))
    elif kind == "cylinder":
        r = rng.uniform(0.25, 0.7)
        size = (r, rng.uniform(0.3, 1.0), r)
    else:
        r = rng.uniform(0.3, 0.8)
        size = (r, rng.uniform(0.4, 1.1), r)
    size = tuple(_r(s) for s in size)
    colour = _rgb(rng.uniform(), rng.uniform(0.45, 0.95), rng.uniform(0.55, 1.0))
    texture = str(rng.choice(OBJECT_TEXTURES, p=[0.5, 0.25, 0.25]))
    return {"kind": kind, "centre": (0.0, size[1], 0.0), "size": size, "yaw": _r(rng.uniform(0, 360)),
            "colour": colour, "texture": texture}


def _place(rng: np.random.Generator, obj: dict, placed: list[dict], screens: list[tuple[float, float, float]],
           cam: np.ndarray, axes: tuple, tan_half: float, attempts: int = 60) -> dict | None:
    """Put ``obj`` where its centre projects inside the middle 70 % of the image, 3–10 units away, not touching others.

    Sampling the screen position first (then casting a ray to the plane y = half-height) makes objects spread
    evenly over the picture instead of piling up where the ground happens to be in view. ``screens`` holds each
    placed object's screen disc ``(u, v, ρ)`` (ρ = max(sx, sy) / depth, in the units of u, v); a new object whose
    disc centre falls near another's (closer than 0.8 × the larger ρ) is refused, so no object is hidden whole
    behind another. Appends the accepted object's disc to ``screens``.
    """
    right, up, forward = axes
    hh = obj["size"][1]
    foot = math.hypot(obj["size"][0], obj["size"][2])          # footprint radius (a box's corner reaches this far)
    for _ in range(attempts):
        u, v = rng.uniform(-0.7, 0.7, size=2) * tan_half
        d = forward + u * right + v * up                       # (3,) ray with unit forward component: t = depth
        if abs(d[1]) < 1e-9:
            continue
        t = (hh - cam[1]) / d[1]
        if not MIN_DISTANCE <= t <= MAX_DISTANCE:
            continue
        centre = cam + t * d
        if math.hypot(centre[0] - cam[0], centre[2] - cam[2]) < foot + 0.5:
            continue                                           # keep the camera well outside the object
        if any(math.hypot(centre[0] - o["centre"][0], centre[2] - o["centre"][2])
               < foot + math.hypot(o["size"][0], o["size"][2]) + 0.1 for o in placed):
            continue
        rho = max(obj["size"][0], hh) / t
        if any(math.hypot(u - su, v - sv) < 0.8 * max(rho, sr) for su, sv, sr in screens):
            continue
        screens.append((u, v, rho))
        return {**obj, "centre": (_r(centre[0]), hh, _r(centre[2]))}
    return None


def sample_scene(seed: int, index: int) -> SceneSpec:
    """The random scene number ``index`` of the world with ``seed``: deterministic, independent of other indices.

    Camera: height 1–2.5, pitch 5–25° down, any yaw, position in [-5, 5]², fov 40–65°. Light: elevation 25–70°,
    any azimuth, ambient 0.25–0.45. 1–4 objects (sphere, box, cylinder, cone) resting on the ground with their
    centres 3–10 units in front of the camera and inside the middle 70 % of the image, footprints not overlapping,
    none hidden whole behind another (an object that cannot be placed after 60 draws is dropped).
    """
    if int(seed) < 0 or int(index) < 0:
        raise fail(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng([int(seed), int(index)])
    fov = _r(rng.uniform(40, 65))
    height = _r(rng.uniform(1.0, 2.5))
    pitch = _r(rng.uniform(5, 25))
    yaw = _r(rng.uniform(-180, 180))
    position = tuple(_r(p) for p in rng.uniform(-5, 5, size=2))
    az, el = math.radians(rng.uniform(0, 360)), math.radians(rng.uniform(25, 70))
    light = (_r(math.cos(el) * math.sin(az)), _r(math.sin(el)), _r(math.cos(el) * math.cos(az)))
    ambient = _r(rng.uniform(0.25, 0.45))
    sky_hue = rng.uniform(0.52, 0.68)
    sky_top = _rgb(sky_hue, rng.uniform(0.3, 0.7), rng.uniform(0.7, 0.95))
    sky_horizon = _rgb(sky_hue + rng.uniform(-0.05, 0.05), rng.uniform(0.05, 0.2), rng.uniform(0.85, 1.0))
    ground_kind = str(rng.choice(GROUND_KINDS))
    g_hue, g_sat, g_val = rng.uniform(), rng.uniform(0.05, 0.4), rng.uniform(0.4, 0.75)
    ground_colours = (_rgb(g_hue, g_sat, g_val),
                      _rgb(g_hue + rng.uniform(-0.08, 0.08), g_sat, g_val * rng.uniform(0.55, 0.8)))
    ground_scale = _r(rng.uniform(0.5, 2.0))
    ground_angle = _r(rng.uniform(0, 180))
    ground_seed = int(rng.integers(0, 2**31 - 1))

    cam = np.array([position[0], height, position[1]])
    axes = _camera_axes(yaw, pitch)
    tan_half = math.tan(math.radians(fov) / 2)
    placed: list[dict] = []
    screens: list[tuple[float, float, float]] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        obj = _place(rng, _sample_object(rng), placed, screens, cam, axes, tan_half)
        if obj is not None:
            placed.append(obj)
    if not placed:
        # Practically never (every draw above failed): a small sphere straight ahead, 5 units away, always fits.
        r = 0.5
        ahead = cam + 5.0 * np.array([math.sin(math.radians(yaw)), 0.0, math.cos(math.radians(yaw))])
        placed.append({"kind": "sphere", "centre": (_r(ahead[0]), r, _r(ahead[2])), "size": (r, r, r), "yaw": 0.0,
                       "colour": (0.8, 0.25, 0.2), "texture": "plain"})
    return SceneSpec(camera_position=position, camera_height=height, camera_pitch=pitch, camera_yaw=yaw,
                     fov_deg=fov, light_dir=light, ambient=ambient, sky_top=sky_top, sky_horizon=sky_horizon,
                     ground_kind=ground_kind, ground_colours=ground_colours, ground_scale=ground_scale,
                     ground_angle=ground_angle, ground_seed=ground_seed, objects=tuple(placed))
