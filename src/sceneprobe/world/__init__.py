"""The synthetic 3D world: random scene specs, an analytic ray-casting renderer, dataset folders.

``scenes.py`` says what is in a scene, ``render.py`` turns a spec into RGB + exact depth / saliency / instance ids
(with ``camera.py``, ``shapes.py``, ``raycast.py``, ``shading.py``; ``parallel.py`` spreads scenes over processes),
``dataset.py`` writes and reads dataset folders (ours or a user's own images with optional labels; with
``dataset_write.py``, ``dataset_folder.py``, ``dataset_files.py``, ``dataset_cache.py``, ``splits.py``,
``scene_data.py``).

The function ``render`` is not re-exported here: ``sceneprobe.world.render`` stays the module (a package attribute
named like a submodule would hide it). Use ``from sceneprobe.world.render import render``.
"""
from .dataset import load_dataset
from .dataset_write import make_dataset
from .camera import project
from .render import FAR_DEPTH, SALIENCY_RULE, render_scenes
from .scene_data import SceneData
from .scenes import SceneSpec, sample_scene

__all__ = ["FAR_DEPTH", "SALIENCY_RULE", "SceneData", "SceneSpec", "load_dataset", "make_dataset", "project",
           "render_scenes", "sample_scene"]
