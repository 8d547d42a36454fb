"""Stable Diffusion study on the real SD v1.4 architecture (random weights, no download): cost per store mode.

Builds a random-weight ``StableDiffusionPipeline`` with SD v1.4's configs (U-Net 859.5 M, VAE 83.7 M, CLIP ViT-L/14
text encoder; a character-level tokenizer made here; v1.4's PNDM scheduler), then runs at ``--size`` px on ``--prompts``
prompts:

* ``sample``: the pipeline loop alone (no hooks) — the reference cost;
* ``full``: capture into the activation store (16 U-Net sites + the VAE decoder site, every step), then label and
  probe it (``probe`` may be left out of ``--modes`` when it would take too long);
* ``streamed``: the low-storage mode (statistics on the device, no store), sampling + labels + probes;
* ``profile``: one streamed train batch (``--batch`` prompts) split into text encoder, U-Net, VAE decode per step
  (the decoder run as far as its mid block), the final decode, hooks (incl. rounding rows to the store dtype),
  statistics (Gram / cross sums), subsample copy, host transfers (``.cpu()`` calls and the images' uint8 conversion),
  labelling, PNGs and the rest of
  the loop — against plain sampling of the same batch; with ``--profile-full-decode`` also as before the cut (a whole
  decode at every step). CPU time on a CPU (the machine is shared), wall time on a GPU. When no GPU is at hand the
  projection to the paper's 617-prompt study is printed as arithmetic only, labelled so.

Prints bytes on disk per image, peak RAM (and GPU memory), seconds per image per step for sampling, capture and
probing, the capture and probe time of the same study measured in this run and their ratio (the goal: probe ≤
capture) for each store mode, and projections to the paper's study (617 prompts × 512 px, 16 U-Net sites + VAE, both tasks, the permuted
control) for each store mode. Disk and memory projections are arithmetic on the measured per-image bytes and the
site shapes (they scale with the pixel count); time projections are only meaningful from a run at 512 px.

    .venv/bin/python benchmarks/bench_sd.py --size 64 --prompts 8               # CPU, minutes
    .venv/bin/python benchmarks/bench_sd.py --size 64 --prompts 8 --workers 1   # probes on one core
    .venv/bin/python benchmarks/bench_sd.py --tiny --size 64 --prompts 8 --modes profile --profile-full-decode --threads 1
    python3 benchmarks/bench_sd.py --size 512 --prompts 24 --batch 8 --modes sample,capture,streamed   # one GPU
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PAPER_N, PAPER_RES, LAMBDAS = 617, 512, 11


def build_sd14(dtype: torch.dtype, tiny: bool = False):
    """A random-weight pipeline with SD v1.4's architecture and scheduler (configs as in the v1.4 folder);
    ``tiny``: the same layout (16 U-Net sites, 4-level VAE, CLIP text model) with 1/10 of the widths (smoke test)."""
    ch = (32, 64, 128, 128) if tiny else (320, 640, 1280, 1280)
    vch = (16, 32, 64, 64) if tiny else (128, 256, 512, 512)
    hid = 64 if tiny else 768
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=ch, cross_attention_dim=hid, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=16 if tiny else 32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                        block_out_channels=vch, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=16 if tiny else 32, sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=hid, intermediate_size=4 * hid,
                                        num_hidden_layers=2 if tiny else 12, num_attention_heads=2 if tiny else 12,
                                        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=hid))
    vocab = {"<|startoftext|>": 49406, "<|endoftext|>": 49407}         # v1.4's special ids; letters below
    for k, ch in enumerate("abcdefghijklmnopqrstuvwxyz0123456789"):
        vocab[ch], vocab[ch + "</w>"] = 2 * k, 2 * k + 1
    tmp = Path(tempfile.mkdtemp())
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=77, pad_token="<|endoftext|>")
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe.to(dtype)


def _hwm_reset() -> None:
    """Reset the process's peak-RSS mark (Linux clear_refs 5); ignored where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _hwm() -> tuple[float, float]:
    """(peak RSS GB since the last reset, peak GPU memory GB)."""
    rss = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) / 1e6
    except OSError:
        pass
    if rss is None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    gpu = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0
    return rss, gpu


def _du(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in Path(path).rglob("*") if p.is_file())


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


PROFILE_ORDER = ("text encoder", "U-Net", "VAE decode per step (to the mid block)", "VAE whole decode per step",
                 "VAE final decode", "hooks", "statistics", "subsample copy", "host transfers", "labelling", "PNGs",
                 "rest")


def profile_batch(pipe, model_dir: Path, cfg, csv: Path, lab, args, device, dtype,
                  full_decode: bool = False) -> dict:
    """Seconds of one streamed train batch by part (see the module doc), and of plain sampling of the same batch.

    Every part is timed by wrapping the function that does it (exclusive of the parts timed inside it); "statistics"
    is ``fit.RidgeStats.add`` with the design matrix and label sums it reads, "subsample copy" the rest of
    ``StreamedProbes.train_batch`` (the per-image random positions, row gathers and float16 copies), "rest" the
    batch's time less every part (scheduler steps, CFG arithmetic, Python)."""
    from sceneprobe.capture import recorder as caprec
    from sceneprobe.capture import sd as sdmod
    from sceneprobe.capture.sd import prepare_sd, sample_and_record_sd
    from sceneprobe.probe import fit, streamed
    from sceneprobe.probe.streamed import StreamedProbes, target_of
    cuda = device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    parts: dict[str, float] = {}
    stack: list[float] = []

    def timed(fn, key):
        def wrapper(*a, **k):
            stack.append(0.0)
            _sync()
            t0 = clock()
            try:
                return fn(*a, **k)
            finally:
                _sync()
                dt = clock() - t0
                inner = stack.pop()
                parts[key] = parts.get(key, 0.0) + dt - inner
                if stack:
                    stack[-1] += dt
        return wrapper

    m = prepare_sd(model_dir, csv, steps=args.steps, height=args.size, width=args.size, pipe=pipe,
                   torch_dtype=dtype)
    sampler = m.sampler
    ids = list(range(min(args.batch, len(m.prompts))))
    prompts, seeds = [m.prompts[i] for i in ids], [m.seeds[i] for i in ids]
    work = Path(tempfile.mkdtemp(prefix="bench_sd_profile_"))
    saved: list = []

    def patch(obj, name, key, fn=None):
        saved.append((obj, name, name in vars(obj), getattr(obj, name)))
        setattr(obj, name, timed(fn or getattr(obj, name), key))

    def batch() -> float:
        sp = StreamedProbes(m.shapes, m.n_steps, sampler.size, cfg, m.device)
        acts: dict = {}
        _sync()
        t0 = clock()
        imgs = sample_and_record_sd(sampler, prompts, seeds, m.unet_sites, m.vae_sites, "attn",
                                    lambda site, step, y: acts.__setitem__((site, step), sp.prepare(y)),
                                    m.device, m.dtype)
        sdmod.save_images(work, ids, imgs)
        got = labmod.label_images(lab, imgs)
        sp.train_batch(acts, ids, target_of(got["depth"], cfg.probe.depth_target), got["saliency"] > 0)
        _sync()
        return clock() - t0

    import sceneprobe.labeller as labmod
    with torch.no_grad():
        batch()                                                       # warm-up: allocator, kernels
        _sync()
        t0 = clock()
        sampler.decode(sampler.sample(prompts, seeds, device, dtype))
        _sync()
        plain = clock() - t0
    decode, to_mid = sampler.decode, sdmod.decode_to_mid            # unwrapped, for the per-step decodes
    patch(sampler, "embed", "text encoder")
    patch(sampler, "decode", "VAE final decode")
    if full_decode:                                                   # before the cut: a whole decode at every step
        patch(sdmod, "decode_to_mid", "VAE whole decode per step", lambda vae, z, fn: decode(z))
    else:
        patch(sdmod, "decode_to_mid", "VAE decode per step (to the mid block)",
              lambda vae, z, fn: to_mid(vae, z, lambda v, zz: decode(zz)))
    hook = caprec.Recorder._hook                                      # the factory: each hook it makes is timed
    saved.append((caprec.Recorder, "_hook", True, hook))
    caprec.Recorder._hook = lambda self, site: timed(hook(self, site), "hooks")
    for name in ("_design", "_clean"):
        patch(streamed, name, "statistics")
    patch(fit.RidgeStats, "add", "statistics")
    patch(fit, "block_sum", "statistics")
    patch(StreamedProbes, "train_batch", "subsample copy")
    patch(torch.Tensor, "cpu", "host transfers")
    patch(sdmod, "to_uint8", "host transfers")
    patch(labmod, "label_images", "labelling")
    patch(sdmod, "save_images", "PNGs")
    unet_t: list[float] = []

    def unet_start(mod, a) -> None:
        _sync()
        unet_t.append(clock())
        stack.append(0.0)

    def unet_done(mod, a, out) -> None:
        _sync()
        dt = clock() - unet_t.pop()
        parts["U-Net"] = parts.get("U-Net", 0.0) + dt - stack.pop()
        if stack:
            stack[-1] += dt
    handles = [sampler.unet.register_forward_pre_hook(unet_start), sampler.unet.register_forward_hook(unet_done)]
    try:
        with torch.no_grad():
            total = batch()
    finally:
        for h in handles:
            h.remove()
        for obj, name, own, fn in reversed(saved):
            if own:
                setattr(obj, name, fn)
            else:
                delattr(obj, name)                                    # it was inherited (torch.Tensor.cpu)
        shutil.rmtree(work, ignore_errors=True)
    parts["rest"] = total - sum(parts.values())
    what = "whole VAE decode at every step (before the cut)" if full_decode else "VAE to its mid block per step"
    print(f"profile of one streamed train batch ({len(ids)} prompts x {args.size} px, {m.n_steps} U-Net calls, "
          f"{len(m.unet_sites)} U-Net sites + VAE, {what}; {'wall' if cuda else 'CPU'} time on "
          f"{torch.cuda.get_device_name() if cuda else 'cpu'}): {total:.3f} s = {total / plain:.2f}x plain sampling "
          f"of the same batch ({plain:.3f} s; issue 23's goal, on a GPU at 512 px: <= 2x"
          f"{(': met' if total <= 2 * plain else ': not met') if cuda and args.size == 512 else ' -- judged only there'})",
          flush=True)
    for k in PROFILE_ORDER:
        if k in parts:
            print(f"  {k:40s} {parts[k]:8.3f} s  {100 * parts[k] / total:5.1f} %", flush=True)
    return {"total_s": total, "plain_s": plain, "ratio": total / plain, "parts_s": parts}


H200_PLAIN_S, H200_STREAMED_S = 0.155, 0.76   # s/image, SD v1.4 at 512 px on one H200, as measured in issue 23


def flop_projection() -> dict:
    """ARITHMETIC, not a measurement: FLOPs of SD v1.4 at 512 px (counted by ``FlopCounterMode`` on the meta device,
    nothing computed) per image — a CFG U-Net call (batch 2), a whole VAE decode, the decode up to the mid block —
    and what they make of the H200 figures of issue 23 for the paper's 617 prompts x 2 models (model + permuted),
    assuming time ∝ FLOPs for the model passes and the rest of the measured streamed time unchanged."""
    from torch.utils.flop_counter import FlopCounterMode
    from sceneprobe.capture.vae_decodes import decode_to_mid
    with torch.device("meta"):
        pipe = build_sd14(torch.float32)
    lat = PAPER_RES // 8
    z, emb = torch.zeros(2, 4, lat, lat, device="meta"), torch.zeros(2, 77, 768, device="meta")

    def flops(fn) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops() / 1e12

    unet = flops(lambda: pipe.unet(z, torch.tensor(10, device="meta"), encoder_hidden_states=emb))
    whole = flops(lambda: pipe.vae.decode(z[:1]))
    mid = flops(lambda: decode_to_mid(pipe.vae, z[:1], lambda v, x: v.decode(x)))
    calls = 16                                                       # PNDM's 15 steps + its warm-up call
    plain = calls * unet + whole
    before = calls * unet + calls * whole                            # the last step's decode is the final image
    after = calls * unet + (calls - 1) * mid + whole
    other = H200_STREAMED_S - H200_PLAIN_S * before / plain          # the measured streamed time beyond the passes
    per_image = H200_PLAIN_S * after / plain + other
    out = {"unet_cfg_call_tflop": unet, "vae_decode_tflop": whole, "vae_to_mid_tflop": mid,
           "capture_over_plain_flops_before": before / plain, "capture_over_plain_flops_after": after / plain,
           "h200_other_s_per_image": other, "projected_streamed_s_per_image": per_image,
           "projected_617x2_min": PAPER_N * 2 * per_image / 60}
    print(f"ARITHMETIC (no GPU measured in this run): SD v1.4 at {PAPER_RES} px per image: CFG U-Net call "
          f"{unet:.2f} TFLOP x {calls}, whole VAE decode {whole:.2f} TFLOP, decode to the mid block {mid:.3f} TFLOP -> "
          f"model passes of the streamed capture {before / plain:.2f}x plain sampling before the cut (a whole decode "
          f"per step), {after / plain:.2f}x after. With issue 23's H200 figures (plain {H200_PLAIN_S} s/image, "
          f"streamed {H200_STREAMED_S} s/image, so {other:.2f} s/image beyond the model passes) and time ∝ FLOPs: "
          f"{per_image:.2f} s/image = {per_image / H200_PLAIN_S:.1f}x plain, the paper's 617 prompts x 2 models "
          f"{out['projected_617x2_min']:.1f} min on one H200 (an H100 is slower; goal <= 30 min on one H100) — "
          f"until the {other:.2f} s/image beyond the passes is measured again on a GPU", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64, help="image size in pixels (512 = the paper's)")
    ap.add_argument("--prompts", type=int, default=8, help="number of prompts (≥ 7 for train/val/test rows)")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=4, help="prompts per batch")
    ap.add_argument("--subsample", type=int, default=64, help="streamed: stored train positions per image/site/step")
    ap.add_argument("--controls", default="permuted", help="permuted or none")
    ap.add_argument("--modes", default="sample,full,probe,streamed",
                    help="comma-separated: sample, full (capture), probe (label + probe the full store), streamed")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--progress", action="store_true", help="progress bars and phase times of the streamed mode")
    ap.add_argument("--tiny", action="store_true", help="1/10 widths (a smoke test of the script, not SD's figures)")
    ap.add_argument("--workers", type=int, default=0, help="probe.workers (0: every core)")
    ap.add_argument("--probe-device", default="auto", help="probe.device: auto, cpu or cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default; 1 on a shared CPU, "
                    "where CPU time counts the other threads' waiting)")
    ap.add_argument("--profile-full-decode", action="store_true",
                    help="profile: also profile the batch with a whole VAE decode at every step (before the cut)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from sceneprobe.capture.sd import SDSampler, make_scheduler, run_capture_sd
    from sceneprobe.config import load_config
    from sceneprobe.probe.streamed_sd import run_streamed_sd
    from sceneprobe.study_sd import make_labeller

    cuda = torch.cuda.is_available()
    dtype = torch.float16 if cuda else torch.float32
    device = torch.device("cuda" if cuda else "cpu")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    controls = [] if args.controls in ("", "none") else [args.controls]
    models = 1 + len(controls)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_sd_"))
    work.mkdir(parents=True, exist_ok=True)
    csv = work / "prompts.csv"
    csv.write_text("prompt,seed\n" + "".join(f"a photo of object {i} on a table,{1000 + 7 * i}\n"
                                             for i in range(args.prompts)))
    t0 = time.time()
    pipe = build_sd14(dtype, args.tiny)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.to(device).eval()
    model_dir = work / "bench-sd14"             # model_index.json only: the family is read from it, the pipe is passed
    pipe.save_config(model_dir)
    n_unet = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    n_vae = sum(p.numel() for p in pipe.vae.parameters()) / 1e6
    print(f"built {'TINY ' if args.tiny else ''}SD v1.4 architecture (random weights): U-Net {n_unet:.1f} M, VAE {n_vae:.1f} M, in "
          f"{time.time() - t0:.0f} s on {torch.cuda.get_device_name() if cuda else 'cpu'} ({dtype})", flush=True)
    over = {"capture": {"steps": args.steps, "batch_size": args.batch, "height": args.size, "width": args.size,
                        "subsample": args.subsample},
            "probe": {"workers": args.workers, "device": args.probe_device}}
    cfg = load_config("cpu", None, over)
    N, res = args.prompts, args.size
    fig: dict = {"size": res, "prompts": N, "steps": args.steps, "device": str(device), "dtype": str(dtype),
                 "models": models}
    prompts = [f"a photo of object {i} on a table" for i in range(N)]
    seeds = [1000 + 7 * i for i in range(N)]

    sampler = SDSampler(pipe, pipe.unet, make_scheduler(pipe), args.steps, 7.5, "", res, res)
    n_steps = sampler.n_steps
    fig["unet_calls_per_image"] = n_steps
    if "sample" in modes:
        _hwm_reset()
        with torch.no_grad():
            sampler.sample(prompts[:1], seeds[:1], device, dtype)      # warm-up
            _sync()
            t = time.time()
            for i in range(0, N, args.batch):
                x = sampler.sample(prompts[i:i + args.batch], seeds[i:i + args.batch], device, dtype)
                sampler.decode(x)
            _sync()
        fig["sample_s_per_image_step"] = (time.time() - t) / (N * n_steps)
        fig["sample_peak_rss_gb"], fig["sample_peak_gpu_gb"] = _hwm()
        print(f"sampling: {fig['sample_s_per_image_step']:.4f} s/image/step", flush=True)
    lab = make_labeller()
    if "profile" in modes:
        fig["profile"] = {"mid-block stop": profile_batch(pipe, model_dir, cfg, csv, lab, args, device, dtype)}
        if args.profile_full_decode:
            fig["profile"]["whole decode per step"] = profile_batch(pipe, model_dir, cfg, csv, lab, args, device,
                                                                    dtype,
                                                                    full_decode=True)
        if not cuda:
            print("no GPU in this session: the profile above is CPU time at this size, not a GPU figure")
            fig["arithmetic_projection_617"] = flop_projection()
    if "streamed" in modes:
        run = work / "streamed"
        _hwm_reset()
        fig["streamed_base_rss_gb"] = _hwm()[0]          # the pipeline, the labeller, Python: before streamed mode
        t = time.time()
        secs: dict = {}
        run_streamed_sd(cfg, model_dir, csv, run, lab, controls=controls, progress=args.progress,
                        pipe=pipe, log=lambda s: print(f"{time.time() - t:7.1f} s {s}", flush=True), seconds=secs)
        _sync()
        dt = time.time() - t
        probe_s = sum(v for ph in secs.values() for k, v in ph.items() if k != "total")
        fig["streamed_probe_s"] = probe_s                       # statistics, fits, predictions, metrics
        fig["streamed_capture_s"] = sum(ph["total"] for ph in secs.values()) - probe_s   # sampling, hooks, labels
        fig["streamed_probe_phases_s"] = {k: sum(ph.get(k, 0.0) for ph in secs.values())
                                          for k in ("statistics", "fit", "predict", "choose", "metrics")}
        fig["streamed_s_per_image_step"] = dt / (N * n_steps * models)
        fig["streamed_peak_rss_gb"], fig["streamed_peak_gpu_gb"] = _hwm()
        fig["streamed_disk_bytes"] = _du(run)
        fig["streamed_images_bytes"] = _du(run / "captures" / "sd" / "images") + \
            _du(run / "captures" / "sd" / "samples.safetensors")
        print(f"streamed (sampling + statistics + labels + probes): {fig['streamed_s_per_image_step']:.4f} "
              f"s/image/step, disk {fig['streamed_disk_bytes'] / 1e6:.1f} MB", flush=True)

    if "full" in modes:
        run = work / "full"
        _hwm_reset()
        t = time.time()
        for control in (None, *controls):
            run_capture_sd(model_dir, csv, run / "captures" / "sd" / (control or "ldm"), args.steps,
                           batch_size=args.batch, height=res, width=res, control=control, pipe=pipe, progress=False,
                           torch_dtype=dtype)
        _sync()
        dt = time.time() - t
        fig["full_capture_s_per_image_step"] = dt / (N * n_steps * models)
        fig["full_capture_s"] = dt
        fig["full_capture_peak_rss_gb"], fig["full_capture_peak_gpu_gb"] = _hwm()
        store = _du(run / "captures" / "sd" / "ldm") - _du(run / "captures" / "sd" / "ldm" / "images")
        fig["full_store_bytes_per_image"] = store / N
        print(f"full capture: {fig['full_capture_s_per_image_step']:.4f} s/image/step (sampling included), "
              f"{store / N / 1e6:.2f} MB/image per model", flush=True)
        if "probe" in modes:
            from sceneprobe.labeller import label_samples
            from sceneprobe.probe.sweep import run_probes
            _hwm_reset()
            t = time.time()
            label_samples(lab, run / "captures" / "sd" / "samples.safetensors", force=True)
            t_lab = time.time() - t
            run_probes(run, cfg.probe, progress=False)
            dt = time.time() - t
            fig["full_label_s"] = t_lab
            fig["full_probe_s"] = dt - t_lab
            fig["full_label_s_per_image"] = t_lab / N
            fig["full_probe_s_per_image_step"] = (dt - t_lab) / (N * n_steps * models)
            fig["full_probe_peak_rss_gb"], _ = _hwm()
            print(f"full probes: {fig['full_probe_s_per_image_step']:.4f} s/image/step", flush=True)
        fig["full_disk_bytes"] = _du(run)
    # ------------------------------------------------------------------ projections to the paper's study
    shapes = {}
    from sceneprobe.capture.sd import prepare_sd
    shapes = prepare_sd(model_dir, csv, steps=args.steps, height=res, width=res, pipe=pipe, torch_dtype=dtype).shapes
    k = (PAPER_RES / res) ** 2                                            # every site grid scales with the pixels
    hw = {s: c_h_w[1] * c_h_w[2] * k for s, c_h_w in shapes.items()}
    d = {s: c_h_w[0] + 1 for s, c_h_w in shapes.items()}
    n_tr, n_va, n_te = round(0.6 * PAPER_N), round(0.15 * PAPER_N), PAPER_N - round(0.6 * PAPER_N) - round(0.15 * PAPER_N)
    full_per_image = sum(shapes[s][0] * hw[s] * 2 for s in shapes) * n_steps   # float16
    proj = {"full_store_gb": full_per_image * PAPER_N * models / 1e9,
            "full_store_gb_per_model": full_per_image * PAPER_N / 1e9}
    labels_gb = PAPER_N * PAPER_RES ** 2 * (4 + 1 + 3) / 1e9            # depth f32, mask u8, samples RGB
    png = fig.get("streamed_images_bytes", 0) / max(N, 1) * k
    proj["streamed_disk_gb"] = labels_gb + png * PAPER_N * 2 / 1e9 + 0.05   # images (model + control), labels, probes
    proj["streamed_G_device_gb"] = sum(d[s] ** 2 * 8 for s in shapes) * n_steps / 1e9
    proj["streamed_subsample_ram_gb"] = n_tr * sum(min(args.subsample, hw[s]) * d[s] * 2 for s in shapes) * n_steps / 1e9
    proj["streamed_val_pred_ram_gb"] = n_va * 2 * LAMBDAS * sum(hw.values()) * 8 * n_steps / 1e9    # float64
    proj["streamed_test_pred_ram_gb"] = n_te * 2 * sum(hw.values()) * 8 * n_steps / 1e9
    proj["streamed_batch_acts_device_gb"] = args.batch * full_per_image / 1e9
    from sceneprobe.processes import resolve_workers
    workers = resolve_workers(args.workers)
    # the solver's float32 copy of one probe's subsample lives only while that probe is fitted (probe/streamed.py
    # frees it with the subsample after the fit): at most one per worker, the largest site's
    proj["streamed_fit_copy_ram_gb"] = workers * n_tr * max(min(args.subsample, hw[s]) * d[s] * 4 for s in shapes) / 1e9
    proj["streamed_ram_gb"] = (proj["streamed_subsample_ram_gb"] + proj["streamed_val_pred_ram_gb"]
                               + proj["streamed_test_pred_ram_gb"] + labels_gb + proj["streamed_fit_copy_ram_gb"])
    if "streamed_peak_rss_gb" in fig:
        # the same arithmetic at this run's scale, beside the peak it measured (statistics in RAM when on the CPU)
        from sceneprobe.capture.split_codes import probe_split
        sp_ = probe_split(list(range(N)))
        r_tr, r_va, r_te = (int((sp_ == c).sum()) for c in (0, 1, 2))
        hw_r = {s: c_h_w[1] * c_h_w[2] for s, c_h_w in shapes.items()}
        ar = {"subsample": r_tr * sum(min(args.subsample, hw_r[s]) * d[s] * 2 for s in shapes) * n_steps,
              "fit_copy": workers * r_tr * max(min(args.subsample, hw_r[s]) * d[s] * 4 for s in shapes),
              "val_predictions": r_va * 2 * LAMBDAS * sum(hw_r.values()) * 8 * n_steps,
              "test_predictions": r_te * 2 * sum(hw_r.values()) * 8 * n_steps,
              "labels": N * res * res * (4 + 1 + 3),
              "statistics": 0 if cuda else sum(d[s] ** 2 * 8 for s in shapes) * n_steps,
              "batch_activations": args.batch * sum(shapes[s][0] * hw_r[s] * 4 for s in shapes) * n_steps}
        fig["streamed_arithmetic_gb"] = {k: v / 1e9 for k, v in ar.items()}
        fig["streamed_arithmetic_total_gb"] = sum(ar.values()) / 1e9
    # checkpoints while a model runs (probe/streamed_sd.py), one process: its statistics, the subsample, the test
    # predictions (val predictions stay in memory); removed when the model's probes are written
    proj["streamed_checkpoints_gb"] = (proj["streamed_G_device_gb"] + proj["streamed_subsample_ram_gb"]
                                       + proj["streamed_test_pred_ram_gb"])
    proj["streamed_peak_disk_gb"] = proj["streamed_disk_gb"] + proj["streamed_checkpoints_gb"]
    if res == PAPER_RES:
        for key in ("sample_s_per_image_step", "full_capture_s_per_image_step", "full_probe_s_per_image_step",
                    "streamed_s_per_image_step"):
            if key in fig:
                proj[key.replace("_s_per_image_step", "_hours")] = fig[key] * PAPER_N * n_steps * models / 3600
    fig["projection_617x512"] = proj
    from sceneprobe.probe.parallel import resolve_device
    from sceneprobe.processes import resolve_workers
    where = f"probes on {resolve_device(args.probe_device).type}, {resolve_workers(args.workers)} worker(s)"
    for mode in ("full", "streamed"):
        if f"{mode}_probe_s" in fig:
            fig[f"{mode}_probe_over_capture"] = fig[f"{mode}_probe_s"] / fig[f"{mode}_capture_s"]
    fig["probes_on"] = where
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=1))
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(fig, indent=1))
    print(f"projection (617 prompts x 512 px, {n_steps} U-Net calls, 16 U-Net sites + VAE, {models} model(s)): "
          f"full store {proj['full_store_gb']:.0f} GB on disk; streamed {proj['streamed_disk_gb']:.1f} GB on disk "
          f"(at most {proj['streamed_peak_disk_gb']:.1f} GB with the checkpoints of a running model), "
          f"{proj['streamed_ram_gb']:.1f} GB RAM (subsample {proj['streamed_subsample_ram_gb']:.1f}, solver's float32 "
          f"copy while a probe is fitted {proj['streamed_fit_copy_ram_gb']:.2f}, val predictions "
          f"{proj['streamed_val_pred_ram_gb']:.1f}, test predictions {proj['streamed_test_pred_ram_gb']:.1f}), "
          f"{proj['streamed_G_device_gb']:.1f} GB statistics + {proj['streamed_batch_acts_device_gb']:.1f} GB batch "
          f"activations on the device")
    if "streamed_arithmetic_total_gb" in fig:
        print(f"streamed memory at this run's scale ({N} prompts x {res} px): measured peak RSS "
              f"{fig['streamed_peak_rss_gb']:.3f} GB = {fig['streamed_base_rss_gb']:.3f} GB before streamed mode "
              f"(pipeline, labeller, Python) + {fig['streamed_peak_rss_gb'] - fig['streamed_base_rss_gb']:.3f} GB; "
              f"arithmetic of what streamed mode holds: {fig['streamed_arithmetic_total_gb']:.3f} GB ("
              + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in fig["streamed_arithmetic_gb"].items()) + ")"
              + (f"; peak GPU {fig['streamed_peak_gpu_gb']:.3f} GB" if cuda else ""))
    for key in ("sample_hours", "full_capture_hours", "full_probe_hours", "streamed_hours"):
        if key in proj:
            print(f"projected {key.replace('_hours', '')}: {proj[key] * 60:.1f} min for the paper's study")
    for mode in ("full", "streamed"):
        if f"{mode}_probe_s" in fig:
            print(f"{mode}: capture {fig[f'{mode}_capture_s']:.1f} s, probe {fig[f'{mode}_probe_s']:.1f} s, "
                  f"probe/capture {fig[f'{mode}_probe_over_capture']:.2f} ({N} prompts x {res} px, {models} model(s), "
                  f"{where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
