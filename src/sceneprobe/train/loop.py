"""One resumable training loop for every model (accelerate for devices and multi-process, no hand-written DDP).

Determinism: all randomness of step ``k`` (batch indices, crops, noise, timesteps) comes from a fresh CPU generator
seeded from ``(seed, k, process index)``. The checkpoint holds model, optimizer, EMA and step, so a run resumed after
a kill replays exactly the steps an uninterrupted run would take; on CPU the final weights are identical.

Learning rate: linear warm-up over ``warmup`` steps, then cosine decay from ``lr`` to ``lr·lr_min_ratio``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from ..errors import fail
from ..processes import use_cpu
from ..sample import sample_seed

LossFn = Callable[[torch.nn.Module, torch.Generator, int], tuple[torch.Tensor, dict]]


@dataclass
class LoopSpec:
    out: Path                 # training folder: checkpoint.pt, metrics.jsonl
    steps: int
    lr: float
    lr_min_ratio: float = 0.05
    warmup: int = 100
    checkpoint_every: int = 250
    log_every: int = 25
    seed: int = 0
    ema_decay: float | None = None
    grad_clip: float = 1.0
    desc: str = "train"


def on_model_device(model: torch.nn.Module, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The batch tensors moved to ``model``'s device. Loss functions draw every batch on the CPU from the step's
    generator (the same numbers on any device, so a GPU run trains on the same batches) and move it here."""
    device = next(model.parameters()).device
    return tuple(t.to(device, non_blocking=True) for t in tensors)


def lr_at(step: int, spec: LoopSpec) -> float:
    warm = min(1.0, (step + 1) / max(1, spec.warmup))
    cos = 0.5 * (1 + math.cos(math.pi * min(step, spec.steps) / max(1, spec.steps)))
    return spec.lr * warm * (spec.lr_min_ratio + (1 - spec.lr_min_ratio) * cos)


def _save_checkpoint(path: Path, model, opt, ema, step: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict() if ema else None,
                "step": step}, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: Path) -> dict:
    """The guarded reader of a training checkpoint: a truncated or foreign file is one error naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a damaged file (RuntimeError, EOFError, UnpicklingError…)
        raise fail(f"checkpoint {path} is truncated or unreadable ({type(e).__name__}); pass --force to start over") \
            from None
    if not isinstance(state, dict) or not {"model", "opt", "step"} <= set(state):
        raise fail(f"checkpoint {path} is not a sceneprobe training checkpoint; pass --force to start over")
    return state


def preflight(out: Path, resume: bool, model: torch.nn.Module | None = None) -> None:
    """Check a training folder before anything is written into it: a checkpoint left by a killed run needs --resume
    (a rerun must not silently start again from step 0), and a resumed checkpoint must be readable (and fit
    ``model``, when given)."""
    ckpt = Path(out) / "checkpoint.pt"
    if ckpt.exists() and not resume:
        raise fail(f"{out} holds a checkpoint of an interrupted training ({ckpt.name}); pass --resume to continue it, "
                   f"or --force to start over")
    if resume and ckpt.exists():
        state = read_checkpoint(ckpt)
        if model is not None:
            import copy
            with _fits(ckpt):
                copy.deepcopy(model).load_state_dict(state["model"])


@contextlib.contextmanager
def _fits(ckpt: Path):
    try:
        yield
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise fail(f"checkpoint {ckpt} does not fit this model ({type(e).__name__}: "
                   f"{str(e).splitlines()[0][:120] if str(e) else ''}); it is from another architecture or "
                   f"config: pass --force to start over with this config") from None


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the log lines of steps already in the checkpoint (the rest will be replayed)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def train_loop(model: torch.nn.Module, loss_fn: LossFn, spec: LoopSpec, resume: bool = False, progress: bool = True):
    """Train ``model`` in place for ``spec.steps`` steps; returns (model, ema or None).

    ``loss_fn(model, generator, step) -> (scalar loss, metrics dict)`` draws its batch from ``generator``.
    """
    from diffusers.training_utils import EMAModel

    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, log_path = out / "checkpoint.pt", out / "metrics.jsonl"
    acc = Accelerator(cpu=use_cpu())  # without cpu=True a CPU machine's processes would each train alone
    # foreach: one fused kernel per step over all tensors (torch only picks it by default on GPUs)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0, foreach=True)
    ema = EMAModel(model.parameters(), decay=spec.ema_decay, model_cls=type(model), model_config=model.config,
                   foreach=True) \
        if spec.ema_decay else None
    start = 0
    preflight(out, resume)
    if resume and ckpt.exists():
        state = read_checkpoint(ckpt)
        with _fits(ckpt):
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            if ema is not None and state["ema"] is not None:
                ema.load_state_dict(state["ema"])
            start = int(state["step"])
        _truncate_metrics(log_path, start)
    elif log_path.exists():
        log_path.unlink()
    model, opt = acc.prepare(model, opt)
    raw = acc.unwrap_model(model)
    if ema is not None:
        ema.to(acc.device)  # the shadow weights live beside the model's (a GPU run: on the GPU)
    model.train()
    bar = tqdm(range(start, spec.steps), initial=start, total=spec.steps, desc=spec.desc, unit="step",
               disable=not progress or not acc.is_main_process, dynamic_ncols=True)
    t0, running = time.time(), None
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, spec)
        g = torch.Generator().manual_seed(sample_seed(spec.seed, step, stream=acc.process_index))
        loss, metrics = loss_fn(model, g, step)
        acc.backward(loss)
        if spec.grad_clip:
            acc.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(raw.parameters())
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        bar.set_postfix(loss=f"{running:.4f}")
        done = step + 1
        if acc.is_main_process and (done % spec.log_every == 0 or done == spec.steps):
            rec = {"step": done, "loss": value, "lr": lr_at(step, spec), "elapsed_s": round(time.time() - t0, 2),
                   **{k: float(v) for k, v in metrics.items()}}
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if acc.is_main_process and (done % spec.checkpoint_every == 0 or done == spec.steps):
            _save_checkpoint(ckpt, raw, opt, ema, done)
    acc.wait_for_everyone()
    model.eval()
    # callers evaluate and save on the CPU beside the VAE and the data (a GPU run hands its model back there too)
    raw.to("cpu")
    if ema is not None:
        ema.to("cpu")
    return raw, ema
