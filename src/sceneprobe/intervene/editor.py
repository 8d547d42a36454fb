"""Edit self-attention outputs during generation: owned hooks, differentiable probes, and the edits themselves.

* :class:`Editor` — a context manager (the recorder's twin, ``capture/recorder.py``) that hooks the U-Net's sites and
  lets an edit function replace a site's output at chosen denoising steps. The step is counted by a forward pre-hook on
  the U-Net itself (one U-Net call per denoising step). Its handles are removed in ``finally``.
* :class:`ProbeHead` — a fitted probe (``probes/<protocol>/<model>/<site>/step_XX.safetensors``) as a differentiable
  map of the activation: per-position linear map over channels at the stored resolution (average-pooled by the
  capture's ``pool``), then nearest upsampling to the label grid — exactly the prediction the sweep scored.
* :func:`optimise_activation` — the paper's edit: Adam on the activation itself, from the original activation,
  minimising the probe's loss against a counterfactual label (saliency: 2-class CE = BCE on the logit difference;
  depth: Huber δ = 1 on standardised depth).
* :class:`ProbeEdit` / :class:`RandomEdit` — edit functions: through a probe (records ‖Δa‖ per site, step and sample;
  optionally rescaled to given norms: the permuted-probe control is *norm-matched* to the real edit, so it differs
  from it only in direction), or along a random direction with a given norm per (site, step, sample) (the equal-norm
  control).
* :class:`DirectionRecorder` / :class:`DoseEdit` — the dose–response (issue 20): the recorder optimises the edit once
  per (site, step, sample) on the *unedited* trajectory (through the run's probe and the permuted U-Net's probe) and
  keeps only the unit directions u = Δ/‖Δ‖ and the optimiser's own size ‖Δ‖/‖a‖; a dose edit then applies
  a′ = a + dose · ‖a‖ · u at every planned (site, step), ‖a‖ the norm (over C, H, W) of the activation it replaces, so
  ‖a′ − a‖/‖a‖ = dose exactly — along the optimised direction, the permuted probe's, or a random one.

Batch independence: the loss optimised is the *sum* over samples of per-sample mean losses and Adam is element-wise,
so each sample's edit is what it would be alone; random directions come from a generator per (edit, site, step).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import fail
from ..capture.recorder import SiteHooks
from ..models.sites import site_path

EditFn = Callable[[str, int, torch.Tensor], "torch.Tensor | None"]   # (site, step, a (B, C, H, W)) → replacement
TASKS = ("saliency", "depth")


# ------------------------------------------------------------------------------------------------------------ hooks
class Editor(SiteHooks):
    """``with Editor(unet, sites, edit_fn): denoise(...)`` — ``edit_fn(site, step, a)`` may replace a site's output.

    ``kind="attn"`` edits the output of ``attn.to_out[0]`` (before the residual, the paper's site), seen by
    ``edit_fn`` as (B, C, H, W) and handed back to the model as (B, H·W, C); ``kind="block"`` edits the ``Attention``
    module's own output. ``edit_fn`` returns the replacement (same shape) or None to leave the output as it is.
    ``applied`` lists the (site, step) pairs that were replaced, in order.
    """

    def __init__(self, unet: nn.Module, sites: Sequence[str], edit_fn: EditFn, kind: str = "attn"):
        for site in dict.fromkeys(sites):
            if site_path(site)[0] != "unet":
                raise fail(f"site {site!r} is not a U-Net site; interventions edit the U-Net during generation")
        super().__init__({"unet": unet}, sites, kind)
        self.unet, self.edit_fn = unet, edit_fn
        self.step = -1                                  # index of the U-Net call in progress (0 = noisiest step)
        self.applied: list[tuple[str, int]] = []

    def _extra_hooks(self):
        return [self.unet.register_forward_pre_hook(self._count)]

    def _count(self, module, args) -> None:
        self.step += 1

    def _hook(self, site: str):
        def fn(module, inputs, output):
            y = output[0] if isinstance(output, tuple) else output
            a = self.to_spatial(site, y)                                         # (B, C, H, W)
            new = self.edit_fn(site, self.step, a)
            if new is None:
                return None
            if new.shape != a.shape:
                raise RuntimeError(f"edit of {site} at step {self.step} changed the shape {tuple(a.shape)} → "
                                   f"{tuple(new.shape)}")
            self.applied.append((site, self.step))
            new = new.to(y.dtype)
            if y.ndim == 3:
                new = new.reshape(new.shape[0], new.shape[1], -1).transpose(1, 2).contiguous()   # (B, H·W, C)
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return fn


# ------------------------------------------------------------------------------------------------------------ probes
@dataclass
class ProbeHead:
    """One fitted (site, step) probe of one task as a function of the activation a (B, C, H, W).

    prediction = upsample_nearest(pool(a) · w + b + o) at the label grid (B, H_l, W_l): the saliency logit
    (w = w₁ − w₀ of the 2-class probe) or standardised depth; o (h, w) is a layout-fair probe's per-position offset
    (its layout channels times their weights, ``<task>.offset`` in the file; absent: 0). The offset does not depend on
    the activation, so it moves the prediction, not the gradient's direction per position.
    """
    task: str
    weight: torch.Tensor            # (C,) float32
    bias: float
    pool: int
    size: tuple[int, int]           # label grid (H_l, W_l)
    offset: torch.Tensor | None = None   # (h, w) float32 at the stored resolution, or None

    def logits(self, a: torch.Tensor) -> torch.Tensor:
        """z = pool(a) · w + b + o at the stored resolution (B, h, w), before the upsampling."""
        x = F.avg_pool2d(a, self.pool) if self.pool > 1 else a               # (B, C, h, w): the stored resolution
        b, c, h, w = x.shape
        # a batched matrix-vector product: ~10× faster on the CPU than einsum's permuted copy
        z = torch.matmul(self.weight.to(x.device, x.dtype), x.reshape(b, c, h * w)).reshape(b, h, w) + self.bias
        if self.offset is not None:
            if tuple(self.offset.shape) != (h, w):
                raise RuntimeError(f"probe offset {tuple(self.offset.shape)} does not match the activation's grid "
                                   f"{(h, w)}")
            z = z + self.offset.to(z.device, z.dtype)
        return z

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        from ..probe.fit import upsample_nearest
        return upsample_nearest(self.logits(a), *self.size)                  # (B, H_l, W_l)

    def loss(self, a: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample loss (B,): saliency BCE on the logit (= the 2-class CE), depth Huber (δ = 1); mean over pixels."""
        z = self(a)
        if self.task == "saliency":
            per = F.binary_cross_entropy_with_logits(z, target.to(z.device, z.dtype), reduction="none")
        else:
            per = F.huber_loss(z, target.to(z.device, z.dtype), delta=1.0, reduction="none")
        return per.flatten(1).mean(1)

    def grad(self, a: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """∂(Σ_b loss_b)/∂a (B, C, H, W) in closed form (what autograd through :meth:`loss` gives, without a graph).

        With u = upsample(z) (B, H_l, W_l), the loss's derivative per pixel is ℓ'(u) = σ(u) − t (BCE) or
        clamp(u − t, −1, 1) (Huber, δ = 1), over H_l·W_l pixels (the mean). The nearest upsampling is u = R z Sᵀ with
        one-hot R (H_l, h), S (W_l, w), so γ = ∂L/∂z = Rᵀ ℓ'(u) S / (H_l W_l) (B, h, w). The probe is linear in a:
        ∂L/∂a_{b,c,y,x} = w_c · γ_{b, y//p, x//p} / p² (p×p average pooling's adjoint)."""
        from ..probe.resolution_maps import nearest_index, upsample_nearest
        z = self.logits(a)
        H, W = self.size
        u = upsample_nearest(z, H, W)                                        # (B, H_l, W_l)
        R = F.one_hot(torch.from_numpy(nearest_index(H, z.shape[1])).long(), z.shape[1]).to(z)   # (H_l, h)
        S = F.one_hot(torch.from_numpy(nearest_index(W, z.shape[2])).long(), z.shape[2]).to(z)   # (W_l, w)
        t = target.to(u.device, u.dtype)
        d = torch.sigmoid(u) - t if self.task == "saliency" else (u - t).clamp(-1.0, 1.0)
        gz = R.T @ d @ S / (H * W)                                           # (B, h, w)
        g = gz[:, None] * self.weight.to(z.device, z.dtype)[None, :, None, None]   # (B, C, h, w)
        if self.pool > 1:
            g = g.repeat_interleave(self.pool, 2).repeat_interleave(self.pool, 3) / (self.pool * self.pool)
        return g


def load_probe_head(path: Path, task: str, pool: int, size: tuple[int, int]) -> ProbeHead:
    """Read one probe file of the sweep (``probe/sweep.py``: ``probe_tensors``) as a :class:`ProbeHead`."""
    from safetensors.torch import load_file
    if task not in TASKS:
        raise fail(f"task {task!r} is unknown; choose saliency or depth")
    path = Path(path)
    if not path.is_file():
        raise fail(f"probe file {path} is missing; run `sceneprobe probe --run RUN` first")
    try:
        t = load_file(str(path))
    except Exception as e:                                                     # damaged file: say which one
        raise fail(f"probe file {path} is unreadable ({type(e).__name__}); rerun `sceneprobe probe`") from None
    offset = None
    if task == "saliency":
        w, b = t["saliency.weight"], t["saliency.bias"]
        weight, bias = w[:, 1] - w[:, 0], float(b[1] - b[0])
        if "saliency.offset" in t:                                             # (2, h, w): the logit's is o₁ − o₀
            offset = t["saliency.offset"][1] - t["saliency.offset"][0]
    else:
        weight, bias = t["depth.weight"][:, 0], float(t["depth.bias"][0])
        if "depth.offset" in t:                                                # (1, h, w)
            offset = t["depth.offset"][0]
    return ProbeHead(task, weight.float().contiguous(), bias, int(pool), (int(size[0]), int(size[1])),
                     None if offset is None else offset.float().contiguous())


def depth_norm(path: Path) -> tuple[float, float]:
    """(mean, std) that standardise depth for a probe file (the probe-train split's statistics)."""
    from safetensors.torch import load_file
    d = load_file(str(path))["depth_norm"]
    return float(d[0]), float(d[1])


def optimise_activation(a0: torch.Tensor, head: ProbeHead, target: torch.Tensor, lr: float,
                        iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adam on the activation itself (from ``a0`` (B, C, H, W)) toward ``target`` (B, H_l, W_l) through ``head``.

    Returns (edited activation, per-sample loss before (B,), per-sample loss after (B,)). Runs in float32; the
    gradient is :meth:`ProbeHead.grad`'s (the same as autograd's through the probe, without a graph over the
    activation), so it also runs inside ``torch.no_grad`` (generation).
    """
    # contiguous: the site's activation is often a transposed view (B, H·W, C → B, C, H, W), and the fused step walks
    # the parameter and its gradient as flat memory, so both must have the same (standard) strides
    a = a0.detach().float().clone(memory_format=torch.contiguous_format)
    target = target.to(a.device)
    # fused: one kernel per step instead of ~10 passes over a (the CPU and CUDA builds have it; elementwise, so each
    # sample's edit is still what it would be alone)
    opt = torch.optim.Adam([a], lr=lr, fused=a.device.type in ("cpu", "cuda"))
    before = head.loss(a, target)
    for _ in range(iters):
        a.grad = head.grad(a, target)                                       # of the sum: samples stay independent
        opt.step()
    after = head.loss(a, target)
    return a.to(a0.dtype), before, after


# ------------------------------------------------------------------------------------------------------------- edits
class ProbeEdit:
    """Edit function: at each planned (site, step), optimise the activation through that probe toward ``target``.

    With ``match_norms`` {(site, step): (B,)} the optimised change Δ is rescaled to that norm per sample,
    a′ = a + Δ · n/‖Δ‖ (direction from this probe, size from another edit; a zero Δ stays zero).
    Records per (site, step): ``norms`` ‖a′ − a‖ (B,) as applied, ``raw_norms`` ‖Δ‖ before any rescaling, ``before`` /
    ``after`` probe losses (B,) (after: of the applied a′).
    """

    def __init__(self, heads: Mapping[tuple[str, int], ProbeHead], target: torch.Tensor, lr: float, iters: int,
                 match_norms: Mapping[tuple[str, int], torch.Tensor] | None = None):
        self.heads, self.target, self.lr, self.iters = dict(heads), target, lr, iters
        self.match_norms = None if match_norms is None else dict(match_norms)
        self.norms: dict[tuple[str, int], torch.Tensor] = {}
        self.raw_norms: dict[tuple[str, int], torch.Tensor] = {}
        self.before: dict[tuple[str, int], torch.Tensor] = {}
        self.after: dict[tuple[str, int], torch.Tensor] = {}

    def __call__(self, site: str, step: int, a: torch.Tensor) -> torch.Tensor | None:
        head = self.heads.get((site, step))
        if head is None:
            return None
        key = (site, step)
        new, b, f = optimise_activation(a, head, self.target, self.lr, self.iters)
        delta = new.float() - a.float()                                               # (B, C, H, W)
        raw = delta.flatten(1).norm(dim=1)                                            # (B,)
        self.raw_norms[key] = raw
        if self.match_norms is not None:
            want = self.match_norms[key].to(raw)
            scale = torch.where(raw > 0, want / raw.clamp_min(1e-30), torch.zeros_like(raw))
            new = (a.float() + delta * scale[:, None, None, None]).to(a.dtype)
            f = head.loss(new.float(), self.target).detach()
        self.norms[key] = (new.float() - a.float()).flatten(1).norm(dim=1)
        self.before[key], self.after[key] = b, f
        return new


def random_direction(shape: Sequence[int], seed: Sequence[int]) -> torch.Tensor:
    """A unit vector of ``shape`` (Gaussian direction), from a generator seeded by the integer tuple ``seed``."""
    import numpy as np
    s = int(np.random.SeedSequence([int(x) for x in seed]).generate_state(1, np.uint64)[0] % (2**63 - 1))
    g = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(s))
    return g / g.norm()


class RandomEdit:
    """Equal-norm control: at each (site, step) of ``norms`` add Δ = ‖Δa‖ · u, u a random unit direction per sample.

    ``keys[b]`` (ints) identify sample b's edit, so its direction is the same in any batch. ``heads`` (optional)
    score the main probe's loss before and after the random step, for comparison with :class:`ProbeEdit`.
    """

    def __init__(self, norms: Mapping[tuple[str, int], torch.Tensor], keys: Sequence[Sequence[int]],
                 site_index: Mapping[str, int], heads: Mapping[tuple[str, int], ProbeHead] | None = None,
                 target: torch.Tensor | None = None):
        self.norms, self.keys, self.site_index = dict(norms), [tuple(k) for k in keys], dict(site_index)
        self.heads, self.target = dict(heads or {}), target
        self.applied_norms: dict[tuple[str, int], torch.Tensor] = {}
        self.before: dict[tuple[str, int], torch.Tensor] = {}
        self.after: dict[tuple[str, int], torch.Tensor] = {}

    def __call__(self, site: str, step: int, a: torch.Tensor) -> torch.Tensor | None:
        key = (site, step)
        if key not in self.norms:
            return None
        n = self.norms[key]
        u = torch.stack([random_direction(a.shape[1:], (*k, self.site_index[site], step)) for k in self.keys])
        delta = n.to(a.device, a.dtype)[:, None, None, None] * u.to(a.device, a.dtype)               # (B, C, H, W)
        new = a + delta
        self.applied_norms[key] = (new.float() - a.float()).flatten(1).norm(dim=1)
        head = self.heads.get(key)
        if head is not None and self.target is not None:
            self.before[key] = head.loss(a.float(), self.target)
            self.after[key] = head.loss(new.float(), self.target)
        return new


# ------------------------------------------------------------------------------------------------------ dose-response
def unit_rows(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ/‖Δ‖ per sample (B, ...), ‖Δ‖ (B,)); a zero Δ stays zero (no direction)."""
    n = delta.flatten(1).norm(dim=1)                                                  # (B,)
    scale = torch.where(n > 0, 1.0 / n.clamp_min(1e-30), torch.zeros_like(n))
    return delta * scale.view(-1, *([1] * (delta.ndim - 1))), n


class DirectionRecorder:
    """Edit function that changes nothing: at each planned (site, step) it optimises the activation through each
    head set (``{"probe": heads, "permuted_probe": perm_heads}``) toward ``target`` and records, per arm and key,
    the unit direction ``dirs[arm][key]`` (B, C, H, W) float32, the optimiser's own dose ``natural[arm][key]`` =
    ‖Δ‖/‖a‖ (B,) and the probe loss ``before`` / ``after`` the free optimisation (B,).

    Run during an unedited generation, every direction is optimised at the unedited activation of its (site, step);
    the dose edits apply them on their own trajectories (:class:`DoseEdit`).
    """

    def __init__(self, head_sets: Mapping[str, Mapping[tuple[str, int], ProbeHead]], target: torch.Tensor,
                 lr: float, iters: int):
        self.head_sets = {arm: dict(h) for arm, h in head_sets.items()}
        self.target, self.lr, self.iters = target, lr, iters
        self.dirs: dict[str, dict[tuple[str, int], torch.Tensor]] = {arm: {} for arm in self.head_sets}
        self.natural: dict[str, dict[tuple[str, int], torch.Tensor]] = {arm: {} for arm in self.head_sets}
        self.before: dict[str, dict[tuple[str, int], torch.Tensor]] = {arm: {} for arm in self.head_sets}
        self.after: dict[str, dict[tuple[str, int], torch.Tensor]] = {arm: {} for arm in self.head_sets}
        self.seen: list[tuple[str, int]] = []

    def __call__(self, site: str, step: int, a: torch.Tensor) -> None:
        key = (site, step)
        for arm, heads in self.head_sets.items():
            head = heads.get(key)
            if head is None:
                continue
            new, b, f = optimise_activation(a, head, self.target, self.lr, self.iters)
            u, n = unit_rows(new.float() - a.float())                                 # (B, C, H, W), (B,)
            self.dirs[arm][key] = u
            self.natural[arm][key] = n / a.float().flatten(1).norm(dim=1).clamp_min(1e-30)
            self.before[arm][key], self.after[arm][key] = b, f
            if key not in self.seen:
                self.seen.append(key)
        return None


DirectionFn = Callable[[tuple[str, int], Sequence[int]], torch.Tensor]   # (key, (C, H, W)) → unit direction (C, H, W)


class DoseEdit:
    """Edit function of a batch whose row b is edited along ``directions[b]`` with relative size ``doses[b]``:
    a′_b = a_b + doses[b] · ‖a_b‖ · u_b(site, step) at each planned (site, step) of ``keys``.

    ``directions[b](key, shape)`` returns the unit direction (C, H, W) of row b at ``key`` (a stored optimised
    direction, or :func:`random_direction`); a zero direction (the optimiser did not move) leaves the row as it is.
    Records per key: ``ratios`` ‖a′ − a‖/‖a‖ (B,) as applied, ``act_norms`` ‖a‖ (B,), and with ``heads`` / ``target``
    (B, H_l, W_l) the run's probe loss ``before`` / ``after`` the step (B,). A dose of 0 returns ``a`` itself.
    """

    def __init__(self, keys: Sequence[tuple[str, int]], doses: Sequence[float], directions: Sequence[DirectionFn],
                 heads: Mapping[tuple[str, int], ProbeHead] | None = None, target: torch.Tensor | None = None):
        if len(doses) != len(directions):
            raise ValueError(f"{len(doses)} doses for {len(directions)} direction rows")
        self.keys, self.doses, self.directions = set(keys), [float(d) for d in doses], list(directions)
        self.heads, self.target = dict(heads or {}), target
        self.ratios: dict[tuple[str, int], torch.Tensor] = {}
        self.act_norms: dict[tuple[str, int], torch.Tensor] = {}
        self.before: dict[tuple[str, int], torch.Tensor] = {}
        self.after: dict[tuple[str, int], torch.Tensor] = {}

    def __call__(self, site: str, step: int, a: torch.Tensor) -> torch.Tensor | None:
        key = (site, step)
        if key not in self.keys:
            return None
        if len(self.doses) != a.shape[0]:
            raise RuntimeError(f"dose edit of {len(self.doses)} rows got a batch of {a.shape[0]}")
        af = a.float()
        norm = af.flatten(1).norm(dim=1)                                              # (B,) ‖a‖
        u = torch.stack([fn(key, tuple(a.shape[1:])).to(a.device, torch.float32) for fn in self.directions])
        size = torch.tensor(self.doses, dtype=torch.float32, device=a.device) * norm  # (B,) dose · ‖a‖
        new = (af + size[:, None, None, None] * u).to(a.dtype)                        # (B, C, H, W)
        new = torch.where(torch.tensor(self.doses, device=a.device)[:, None, None, None] == 0, a, new)
        self.ratios[key] = (new.float() - af).flatten(1).norm(dim=1) / norm.clamp_min(1e-30)
        self.act_norms[key] = norm
        head = self.heads.get(key)
        if head is not None and self.target is not None:
            self.before[key] = head.loss(af, self.target).detach()
            self.after[key] = head.loss(new.float(), self.target).detach()
        return new
