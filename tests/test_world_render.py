"""Specifications of the ray-casting renderer: exact depth, occlusion, shadows, conventions, determinism."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sceneprobe.errors import SceneprobeError
from sceneprobe.world.camera import project
from sceneprobe.world.render import FAR_DEPTH, render, render_scenes
from sceneprobe.world.scenes import SceneSpec, sample_scene

SIZE = 65      # odd: the centre pixel's ray is exactly the optical axis


def level_camera(h: float = 1.0, **kw) -> dict:
    """A camera at (0, h, 0) looking level along +z (the optical axis is the line y = h, x = 0)."""
    return dict(camera_position=(0.0, 0.0), camera_height=h, camera_pitch=0.0, camera_yaw=0.0, fov_deg=50.0, **kw)


def obj(kind: str, centre, size, yaw: float = 0.0, colour=(0.8, 0.3, 0.2)) -> dict:
    return {"kind": kind, "centre": centre, "size": size, "yaw": yaw, "colour": colour, "texture": "plain"}


def centre_pixel(out: dict) -> tuple[float, int]:
    c = SIZE // 2
    return float(out["depth"][c, c]), int(out["instances"][c, c])


def test_outputs_have_the_documented_shapes_and_types():
    out = render(sample_scene(0, 0), size=48, supersample=2)
    assert out["rgb"].shape == (48, 48, 3) and out["rgb"].dtype == np.uint8
    assert out["depth"].shape == (48, 48) and out["depth"].dtype == np.float32
    assert out["instances"].shape == (48, 48) and out["instances"].dtype == np.uint8
    assert out["saliency"].dtype == bool
    np.testing.assert_array_equal(out["saliency"], out["instances"] >= 2)
    assert out["depth"].max() <= FAR_DEPTH and out["depth"].min() > 0
    np.testing.assert_array_equal(out["depth"][out["instances"] == 0], FAR_DEPTH)


@pytest.mark.parametrize("d, r", [(5.0, 1.0), (9.0, 0.5)])
def test_sphere_straight_ahead_has_depth_d_minus_r_at_its_centre_pixel(d, r):
    spec = SceneSpec(**level_camera(h=1.0), objects=[obj("sphere", (0.0, 1.0, d), (r, r, r))])
    depth, inst = centre_pixel(render(spec, size=SIZE))
    assert inst == 2
    assert depth == pytest.approx(d - r, rel=1e-5)


def test_ground_depth_matches_camera_geometry():
    # Pinhole: row i looks along v = (1 − (i + ½)/W·2)·tan(fov/2); the ground y = 0 is met at camera depth
    # z = h / (sin p − v cos p), whatever the column, yaw or position.
    h, pitch, fov, size = 1.7, 20.0, 60.0, 64
    spec = SceneSpec(camera_position=(1.0, -2.0), camera_height=h, camera_pitch=pitch, camera_yaw=37.0,
                     fov_deg=fov)
    out = render(spec, size=size)
    tan_half, p = math.tan(math.radians(fov / 2)), math.radians(pitch)
    for i in (20, 33, 47, 63):
        v = (1 - (i + 0.5) / size * 2) * tan_half
        expected = min(h / (math.sin(p) - v * math.cos(p)), FAR_DEPTH)
        for j in (0, 17, 63):
            assert out["instances"][i, j] == 1
            assert out["depth"][i, j] == pytest.approx(expected, rel=1e-5)
    # Rows above the horizon (v > tan p) see the sky at FAR_DEPTH.
    assert out["instances"][0].tolist() == [0] * size
    np.testing.assert_array_equal(out["depth"][0], FAR_DEPTH)


def test_box_cylinder_and_cone_have_exact_depth_where_the_axis_meets_them():
    d, h = 6.0, 1.0
    cases = [
        (obj("box", (0.0, h, d), (0.5, 0.5, 0.4)), d - 0.4),
        # turned 30°: the axis enters where |z − d| = min(sx / sin 30°, sz / cos 30°)
        (obj("box", (0.0, h, d), (0.5, 0.6, 0.4), yaw=30.0), d - min(0.5 / 0.5, 0.4 / math.cos(math.radians(30)))),
        (obj("cylinder", (0.0, h, d), (0.5, 0.8, 0.5)), d - 0.5),
        # cone: radius at mid-height is half the base radius
        (obj("cone", (0.0, h, d), (0.6, 0.8, 0.6)), d - 0.3),
    ]
    for o, expected in cases:
        depth, inst = centre_pixel(render(SceneSpec(**level_camera(h), objects=[o]), size=SIZE))
        assert inst == 2, o["kind"]
        assert depth == pytest.approx(expected, rel=1e-5), o["kind"]


def test_cylinder_top_cap_and_cone_apex_seen_from_above():
    # Camera straight above, looking down (pitch 90): depth = camera height − top of the object.
    for o, top in ((obj("cylinder", (0.0, 0.7, 0.0), (0.5, 0.7, 0.5)), 1.4),
                   (obj("cone", (0.0, 0.9, 0.0), (0.6, 0.9, 0.6)), 1.8)):
        spec = SceneSpec(camera_position=(0.0, 0.0), camera_height=5.0, camera_pitch=90.0, fov_deg=40.0,
                         objects=[o])
        depth, inst = centre_pixel(render(spec, size=SIZE))
        assert inst == 2 and depth == pytest.approx(5.0 - top, rel=1e-4), o["kind"]


def test_a_fully_hidden_object_is_absent_from_depth_mask_and_ids():
    box = obj("box", (0.0, 1.0, 5.0), (1.2, 1.0, 0.5))
    hidden = obj("sphere", (0.0, 0.3, 8.0), (0.3, 0.3, 0.3))
    light = dict(light_dir=(0.0, 1.0, -1.0))                 # light behind the camera: shadows fall away from it
    with_it = render(SceneSpec(**level_camera(1.0), objects=[box, hidden], **light), size=SIZE)
    without = render(SceneSpec(**level_camera(1.0), objects=[box], **light), size=SIZE)
    assert 3 not in with_it["instances"]
    np.testing.assert_array_equal(with_it["depth"], without["depth"])
    np.testing.assert_array_equal(with_it["saliency"], without["saliency"])
    np.testing.assert_array_equal(with_it["instances"], without["instances"])


def test_nearer_object_occludes_farther_one_where_they_overlap():
    near = obj("sphere", (0.0, 1.0, 5.0), (0.5, 0.5, 0.5))
    far = obj("box", (0.0, 1.0, 9.0), (2.0, 1.0, 0.5))
    depth, inst = centre_pixel(render(SceneSpec(**level_camera(1.0), objects=[far, near]), size=SIZE))
    assert inst == 3 and depth == pytest.approx(4.5, rel=1e-5)


def test_world_plus_x_is_on_the_right_of_the_picture_at_yaw_0():
    spec = SceneSpec(**level_camera(1.0), objects=[obj("sphere", (2.0, 1.0, 8.0), (0.5, 0.5, 0.5))])
    cols = np.nonzero(render(spec, size=SIZE)["saliency"])[1]
    assert cols.min() > SIZE // 2
    row, col, z = project(spec, (2.0, 1.0, 8.0), SIZE)
    assert int(row) == SIZE // 2 and z == pytest.approx(8.0)
    assert render(spec, size=SIZE)["instances"][int(row), int(col)] == 2


def test_shadows_fall_on_the_side_away_from_the_light():
    # Light up and to the right (+x): the sphere's shadow lies on the ground to its left (−x).
    grey = (0.5, 0.5, 0.5)
    spec = SceneSpec(camera_position=(0.0, 0.0), camera_height=2.0, camera_pitch=15.0, fov_deg=60.0,
                     light_dir=(1.0, 1.0, 0.0), ambient=0.3, ground_colours=(grey, grey),
                     objects=[obj("sphere", (0.0, 1.0, 6.0), (1.0, 1.0, 1.0))])
    out = render(spec, size=SIZE)
    values = {}
    for side, x in (("dark", -1.3), ("light", 1.3)):
        row, col, _ = project(spec, (x, 0.0, 6.0), SIZE)
        assert out["instances"][int(row), int(col)] == 1, side
        values[side] = out["rgb"][int(row), int(col)].astype(int).sum()
    assert values["dark"] < 0.7 * values["light"]
    # and the sphere is brighter on its lit (+x) side than on its shadowed side
    r, c_left, _ = project(spec, (-0.8, 1.0, 6.0), SIZE)
    _, c_right, _ = project(spec, (0.8, 1.0, 6.0), SIZE)
    assert out["rgb"][int(r), int(c_right)].sum() > out["rgb"][int(r), int(c_left)].sum()


def test_labels_come_from_the_pixel_centre_ray_whatever_the_supersampling():
    spec = sample_scene(0, 3)
    outs = [render(spec, size=40, supersample=s) for s in (1, 2, 3)]
    for o in outs[1:]:
        np.testing.assert_array_equal(o["instances"], outs[0]["instances"])
        np.testing.assert_allclose(o["depth"], outs[0]["depth"], rtol=1e-5)


def test_sampled_scenes_are_deterministic_and_their_objects_visible():
    assert sample_scene(5, 17) == sample_scene(5, 17)
    assert sample_scene(5, 17) != sample_scene(5, 18) and sample_scene(5, 17) != sample_scene(6, 17)
    for i in range(30):
        spec = sample_scene(0, i)
        assert 1 <= len(spec.objects) <= 4
        for o in spec.objects:                               # resting on the ground
            assert o["centre"][1] == o["size"][1]
        inst = render(spec, size=32, supersample=1)["instances"]
        assert (inst >= 2).any(), i
        visible = sum((inst == 2 + k).any() for k in range(len(spec.objects)))
        assert visible >= max(1, len(spec.objects) - 1), i   # at most one hidden behind another


def test_spec_survives_a_json_round_trip_exactly():
    spec = sample_scene(1, 2)
    again = SceneSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    a, b = render(spec, size=32), render(again, size=32)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_bad_specs_and_sizes_are_user_errors():
    with pytest.raises(SceneprobeError, match="size"):
        render(sample_scene(0, 0), size=31)
    with pytest.raises(SceneprobeError, match="size"):
        render(sample_scene(0, 0), size=513)
    with pytest.raises(SceneprobeError, match="supersample"):
        render(sample_scene(0, 0), size=32, supersample=0)
    with pytest.raises(SceneprobeError, match="kind"):
        SceneSpec(objects=[obj("torus", (0, 1, 5), (1, 1, 1))])
    with pytest.raises(SceneprobeError, match="unknown keys"):
        SceneSpec.from_dict({"camera_height": 1.0, "colour": 3})


def test_render_scenes_is_identical_across_workers_and_chunkings():
    kw = dict(size=32, supersample=2)
    one = render_scenes(7, range(6), workers=1, **kw)
    two = render_scenes(7, range(6), workers=2, **kw)
    parts = [render_scenes(7, idx, workers=1, **kw) for idx in ([0, 1], [2, 3, 4], [5])]
    for k in ("rgb", "depth", "saliency", "instances"):
        assert one[k].shape[0] == 6
        assert one[k].tobytes() == two[k].tobytes()
        assert one[k].tobytes() == np.concatenate([p[k] for p in parts]).tobytes()
    assert one["specs"] == two["specs"] == [s for p in parts for s in p["specs"]]
    single = render(sample_scene(7, 4), **kw)
    assert single["rgb"].tobytes() == one["rgb"][4].tobytes()


def test_screen_space_culling_never_drops_a_hit(monkeypatch):
    # The renderer tests each object only against rays in its projected bounding box; testing every ray must
    # give the same picture (scenes with objects near the edges and close to the camera included).
    import importlib

    raycast = importlib.import_module("sceneprobe.world.raycast")

    specs = [sample_scene(2, i) for i in range(8)]
    specs.append(SceneSpec(**level_camera(1.0), objects=[obj("box", (1.3, 0.5, 1.2), (0.5, 0.5, 0.5), yaw=20),
                                                         obj("cone", (-2.5, 0.8, 4.0), (0.6, 0.8, 0.6))]))
    culled = [render(s, size=40, supersample=1) for s in specs]
    monkeypatch.setattr(raycast, "_screen_box", lambda cam, shape, n: (slice(0, n), slice(0, n)))
    for s, a in zip(specs, culled):
        b = render(s, size=40, supersample=1)
        assert all(np.array_equal(a[k], b[k]) for k in a)
