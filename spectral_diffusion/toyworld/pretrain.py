"""Pretrain the toy base model on rendered scenes: stage 1 the VAE, stage 2 the UNet and text encoder.

Budgets are wall-clock minutes of training, because the machine is shared and its speed varies: the warm-up +
cosine learning-rate schedule follows the fraction of the budget spent (kept in the checkpoint across resumes), so
a stage ends on time with a fully decayed learning rate whatever the load. Step counts are logged.

- Data: a fixed, seeded set of rendered scenes, re-rendered in seconds on every run: plain ones
  (`render.sample_spec`) and, a `pattern_share` of them, patterned ones (`render.sample_patterned_spec`) minus the
  held-out concepts' look-alikes (`concepts.is_lookalike`). The VAE also sees uncaptioned clutter
  (`render.render_clutter`). The held-out concepts are never drawn.
- Stage 1 (VAE): MSE + L1 reconstruction, tiny KL weight; PSNR on held-out renders is logged. `vae_from` reuses
  the VAE of an existing model folder instead (the bundled model's, to retrain only the UNet and text encoder).
- Stage 2 (`init_from` starts it from an existing model's UNet and text encoder, a fine-tuning run): the frozen
  VAE encodes every scene once (latent mean and std cached on disk); the latent scaling
  factor is set to 1/std of the latents. UNet + text encoder train on epsilon prediction with min-SNR-5 weighting
  (as the timestep distribution), two noise draws per encoded caption, 10% empty captions (so classifier-free
  guidance works), caption variation (size / position / "a photo of" words at random), EMA of the weights,
  gradient clipping. The defaults rebuild the bundled model's quality in under an hour on 2 CPU cores.
- Checkpoints (`<out>/vae.ckpt`, `<out>/unet.ckpt`) are written atomically every few minutes and on Ctrl-C;
  `resume=True` continues from them. The end result, EMA weights in safetensors (fp16; the text encoder
  fp32), is written as a diffusers folder (default `model.MODEL_DIR`).

API: `PretrainConfig`, `pretrain(config) -> Path`, `export_pipeline(pipe, out_dir)`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline

from spectral_diffusion.atomic import atomic_directory, atomic_write
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.models import TRAINING_DEFAULTS_FILE
from spectral_diffusion.tokenizer import build_clip_tokenizer
from spectral_diffusion.toyworld import concepts, render
from spectral_diffusion.toyworld import model as toy_model
from spectral_diffusion.toyworld.recipe import RECIPE


@dataclass
class PretrainConfig:
    """Defaults are the 2-CPU-core recipe (an hour from scratch, docs/toyworld.md); `out` holds checkpoints, latents
    and the log."""

    out: Path
    model_dir: Path = toy_model.MODEL_DIR
    vae_minutes: float = 10.0
    unet_minutes: float = 60.0
    num_scenes: int = 50_000
    vae_batch: int = 32  # half scenes, half clutter
    unet_batch: int = 64  # UNet samples per step: unet_batch / noise_draws scenes and captions
    noise_draws: int = 2  # noise draws per encoded caption: the text encoder is a third of a step's time
    vae_from: Path | None = None  # a diffusers folder whose VAE is reused: stage 1 is skipped
    init_from: Path | None = None  # a diffusers folder (same vocabulary) whose UNet + text encoder start stage 2
    pattern_share: float = 0.5  # share of the scenes drawn in a pattern
    vae_lr: float = 1e-3
    unet_lr: float = 1e-3
    warmup_steps: int = 300
    kl_weight: float = 1e-6
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    ema_decay: float = 0.999
    checkpoint_minutes: float = 5.0
    seed: int = 0
    threads: int = 2
    device: str = "cpu"  # "cuda" where a GPU is lent: the same run in minutes
    resume: bool = False


def scene_dataset(num: int, seed: int, pattern_share: float = 0.0) -> tuple[list[render.SceneSpec], torch.Tensor]:
    """`num` seeded scenes (a `pattern_share` of them patterned, never a concept's look-alike) and their pixels as
    uint8 [num, 3, 64, 64]."""
    rng = random.Random(seed)
    specs = [render.sample_patterned_spec(rng, concepts.is_lookalike) if rng.random() < pattern_share
             else render.sample_spec(rng) for _ in range(num)]
    pixels = np.stack([np.asarray(render.render_scene(s), dtype=np.uint8) for s in specs])
    return specs, torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def lr_factor(step: int, progress: float, warmup: int, floor: float = 0.05) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `floor` of the peak as `progress` reaches 1."""
    warm = min(1.0, (step + 1) / warmup)
    return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.clamp(-1, 1), b.clamp(-1, 1)).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def atomic_save(obj: object, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class Logger:
    """Timestamped lines to stdout and `<out>/log.txt`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {message}"
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


class StageRunner:
    """A loop over a wall-clock budget with periodic atomic checkpoints and Ctrl-C saving.

    `step_fn(step, progress)` gets the fraction of the budget already spent (accumulated across resumed runs), so
    a schedule ends on time however busy the shared CPU is.
    """

    def __init__(self, name: str, ckpt: Path, minutes: float, checkpoint_minutes: float, log: Logger) -> None:
        self.name, self.ckpt, self.budget, self.log = name, ckpt, minutes * 60, log
        self.checkpoint_seconds = checkpoint_minutes * 60

    def run(self, state: dict, step_fn: Callable[[int, float], dict[str, float]], save_fn: Callable[[], dict],
            on_checkpoint: Callable[[int], None] | None = None) -> None:
        last_save, sums, window, count = time.perf_counter(), {}, time.perf_counter(), 0
        try:
            while state["seconds"] < self.budget:
                start = time.perf_counter()
                for key, value in step_fn(state["step"], state["seconds"] / self.budget).items():
                    sums[key] = sums.get(key, 0.0) + value
                state["step"] += 1
                state["seconds"] += time.perf_counter() - start
                count += 1
                if state["step"] % 100 == 0:
                    means = " ".join(f"{k} {v / count:.4f}" for k, v in sums.items())
                    self.log(f"{self.name} step {state['step']} {means} ({(time.perf_counter() - window) / count:.2f}"
                             f" s/step, {(self.budget - state['seconds']) / 60:.1f} min left)")
                    sums, window, count = {}, time.perf_counter(), 0
                if state["seconds"] < self.budget and time.perf_counter() - last_save > self.checkpoint_seconds:
                    atomic_save(save_fn(), self.ckpt)
                    if on_checkpoint is not None:
                        on_checkpoint(state["step"])
                    last_save = time.perf_counter()
        except KeyboardInterrupt:
            atomic_save(save_fn(), self.ckpt)
            self.log(f"{self.name}: interrupted at step {state['step']}, checkpoint saved")
            raise
        atomic_save(save_fn(), self.ckpt)


def _batches(n: int, batch: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    while True:
        yield from torch.randperm(n, generator=gen).split(batch)


def train_vae(cfg: PretrainConfig, pixels: torch.Tensor, log: Logger) -> tuple[torch.nn.Module, int]:
    """Stage 1. `pixels` are the captioned scenes (uint8); half of every batch is clutter rendered on the fly.

    Returns the VAE and its step count (which identifies it for the latent cache). A resumed run with a larger
    budget continues training (the schedule's progress falls back, a warm restart).
    """
    ckpt = cfg.out / "vae.ckpt"
    torch.manual_seed(cfg.seed)
    vae = toy_model.build_vae().to(cfg.device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    state: dict = {"step": 0, "seconds": 0.0}
    if cfg.resume and ckpt.is_file():
        saved = torch.load(ckpt, weights_only=False, map_location=cfg.device)
        vae.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
        log(f"vae: resumed at step {state['step']}")
        if state["seconds"] >= cfg.vae_minutes * 60:
            return vae.eval(), state["step"]
    gen = torch.Generator().manual_seed(cfg.seed + state["step"])
    clutter_rng = random.Random(cfg.seed + state["step"])
    held = min(256, len(pixels) // 4)  # the last scenes are held out to measure PSNR
    batches = _batches(len(pixels) - held, cfg.vae_batch // 2, gen)
    held_out = pixels[-held:].float().div(127.5).sub(1.0).to(cfg.device)

    def step_fn(step: int, progress: float) -> dict[str, float]:
        for group in opt.param_groups:
            group["lr"] = cfg.vae_lr * lr_factor(step, progress, cfg.warmup_steps)
        scenes = pixels[next(batches)].float().div(127.5).sub(1.0)
        clutter = render.to_tensor([render.render_clutter(clutter_rng) for _ in range(cfg.vae_batch // 2)])
        x = torch.cat([scenes, clutter]).to(cfg.device).contiguous(memory_format=torch.channels_last)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse, l1 = F.mse_loss(recon, x), F.l1_loss(recon, x)
        loss = mse + 0.5 * l1 + cfg.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return {"mse": mse.item(), "l1": l1.item()}

    def report(step: int) -> None:
        log(f"vae step {step}: held-out PSNR {vae_psnr(vae, held_out):.2f} dB")

    def save() -> dict:
        return {"model": vae.state_dict(), "opt": opt.state_dict(), "state": state}

    StageRunner("vae", ckpt, cfg.vae_minutes, cfg.checkpoint_minutes, log).run(state, step_fn, save, report)
    report(state["step"])
    return vae.eval(), state["step"]


def component_weights(folder: Path, component: str, flag: str) -> Path:
    """The weights file of a diffusers folder's component, given as `flag` (checked before any slow work)."""
    weights = sorted((Path(folder) / component).glob("*.safetensors"))
    if not weights:
        raise SpectralDiffusionError(f"{flag} {folder}: no {component}/*.safetensors in that folder")
    return weights[0]


def vae_weights(folder: Path) -> Path:
    return component_weights(folder, "vae", "--vae-from")


def load_init(folder: Path) -> StableDiffusionPipeline:
    """The model of `--init-from` (fp32), checked before any slow work: it must hold a UNet and a text encoder and
    the world's tokenizer vocabulary."""
    for component in ("unet", "text_encoder"):
        component_weights(folder, component, "--init-from")
    init = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        world = build_clip_tokenizer(toy_model.vocabulary(), tmp).get_vocab()
    if init.tokenizer.get_vocab() != world:
        raise SpectralDiffusionError(f"--init-from {folder}: its tokenizer vocabulary is not the toy world's")
    return init


def import_vae(folder: Path, device: str) -> tuple[torch.nn.Module, str]:
    """Stage 1 replaced by the VAE of an existing diffusers folder (fp32), identified by its weights' digest."""
    digest = hashlib.sha256(vae_weights(folder).read_bytes()).hexdigest()[:16]
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=torch.float32).to(device)
    return vae.eval(), f"imported:{digest}"


@torch.no_grad()
def vae_psnr(vae: torch.nn.Module, x: torch.Tensor) -> float:
    """Reconstruction PSNR (posterior mean) of images `x` in [-1, 1]."""
    was_training = vae.training
    vae.eval()
    recon = torch.cat([vae.decode(vae.encode(chunk).latent_dist.mean).sample for chunk in x.split(64)])
    vae.train(was_training)
    return psnr(recon, x)


@torch.no_grad()
def encode_scenes(vae: torch.nn.Module, vae_id: int | str, pixels: torch.Tensor, path: Path,
                  log: Logger) -> dict:
    """Latent mean/std of every scene, cached (fp16) at `path` for `vae_id`: the VAE (its step count, or the digest
    of an imported one) and the scene set."""
    if path.is_file():
        cached = torch.load(path)
        if cached.get("vae_id") == vae_id:  # a cache of an older run (no id) is recomputed
            return cached
    means, stds = [], []
    for chunk in pixels.split(256):
        dist = vae.encode(chunk.float().div(127.5).sub(1.0).to(vae.device)).latent_dist
        means.append(dist.mean.half().cpu())
        stds.append(dist.std.half().cpu())
    latents = {"mean": torch.cat(means), "std": torch.cat(stds), "vae_id": vae_id}
    atomic_save(latents, path)
    log(f"encoded {len(pixels)} scenes -> latents {tuple(latents['mean'].shape)}")
    return latents


def train_unet(cfg: PretrainConfig, pipe: StableDiffusionPipeline, specs: list[render.SceneSpec],
               latents: dict, log: Logger) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Stage 2: UNet + text encoder on cached latents. Returns the EMA copies (unet, text_encoder)."""
    ckpt = cfg.out / "unet.ckpt"
    unet, text_encoder, tokenizer = pipe.unet.to(memory_format=torch.channels_last), pipe.text_encoder, pipe.tokenizer
    scheduler = toy_model.training_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    state: dict = {"step": 0, "seconds": 0.0, "vae_id": latents["vae_id"]}
    if cfg.resume and ckpt.is_file():
        saved = torch.load(ckpt, weights_only=False, map_location=cfg.device)
        if saved["state"].get("vae_id") != latents["vae_id"]:
            raise SpectralDiffusionError(f"{ckpt} was trained on the latents of another VAE or scene set: delete it "
                                         "to restart the UNet stage")
        for module, key in ((unet, "unet"), (text_encoder, "text"), (ema_unet, "ema_unet"), (ema_text, "ema_text")):
            module.load_state_dict(saved[key])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
        log(f"unet: resumed at step {state['step']}")
        if state["seconds"] >= cfg.unet_minutes * 60:
            return ema_unet, ema_text
    scale = pipe.vae.config.scaling_factor
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    # min-SNR weighting (for epsilon prediction) as the timestep distribution instead of a loss factor: the same
    # objective up to scale, and no compute spent on nearly noise-free steps whose weight is almost zero
    timestep_weights = torch.clamp(snr, max=cfg.snr_gamma) / snr
    gen = torch.Generator().manual_seed(cfg.seed + 1 + state["step"])
    rng = random.Random(cfg.seed + 1 + state["step"])
    batches = _batches(len(specs), cfg.unet_batch // cfg.noise_draws, gen)
    unet.train()
    text_encoder.train()

    def prompt(spec: render.SceneSpec) -> str:
        if rng.random() < cfg.caption_dropout:
            return ""
        return render.caption(spec, size=rng.random() < 0.3, position=rng.random() < 0.3, photo=rng.random() < 0.3)

    def step_fn(step: int, progress: float) -> dict[str, float]:
        for group in opt.param_groups:
            group["lr"] = cfg.unet_lr * lr_factor(step, progress, cfg.warmup_steps)
        idx = next(batches)
        ids = tokenizer([prompt(specs[i]) for i in idx.tolist()], padding="max_length",
                        max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(cfg.device)
        hidden = text_encoder(ids)[0].repeat_interleave(cfg.noise_draws, dim=0)
        idx = idx.repeat_interleave(cfg.noise_draws)
        mean, std = latents["mean"][idx].float(), latents["std"][idx].float()
        x0 = ((mean + std * torch.randn(mean.shape, generator=gen)) * scale).to(cfg.device)
        noise = torch.randn(x0.shape, generator=gen).to(cfg.device)
        t = torch.multinomial(timestep_weights, len(idx), replacement=True, generator=gen).to(cfg.device)
        noisy = scheduler.add_noise(x0, noise, t).contiguous(memory_format=torch.channels_last)
        pred = unet(noisy, t, hidden).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        return {"loss": loss.item()}

    def save() -> dict:
        return {"unet": unet.state_dict(), "text": text_encoder.state_dict(), "ema_unet": ema_unet.state_dict(),
                "ema_text": ema_text.state_dict(), "opt": opt.state_dict(), "state": state}

    def snapshot(step: int) -> None:
        sample_grid(pipe, ema_unet, ema_text, cfg.out / f"samples-{step:05d}.png")

    StageRunner("unet", ckpt, cfg.unet_minutes, cfg.checkpoint_minutes, log).run(state, step_fn, save, snapshot)
    return ema_unet, ema_text


def _grid_spec(k: int) -> render.SceneSpec:
    """The k-th monitoring scene: plain ones first, then one of each pattern (a house with a door among them)."""
    colours, patterns = tuple(render.COLOURS), tuple(p for p in render.PATTERNS if p != "plain")
    shape, background = render.SHAPES[k % 8], render.BACKGROUNDS[k % 5]
    k_pattern = k - (16 - len(patterns))
    if k_pattern < 0:
        return render.SceneSpec(shape, colours[(k + 3 * (k // 8)) % 8], background, "medium", "center", 0.5, 0.5)
    pattern = patterns[k_pattern]
    return render.SceneSpec(shape, colours[k % 8], background, "medium", "center", 0.5, 0.5, pattern,
                            colours[(k + 2) % 8], colours[(k + 4) % 8] if pattern == "tricolour" else None,
                            colours[(k + 5) % 8] if shape == "house" else None)


GRID_PROMPTS = tuple(render.caption(_grid_spec(k)) for k in range(16))


@torch.no_grad()
def sample_grid(pipe: StableDiffusionPipeline, unet: torch.nn.Module, text_encoder: torch.nn.Module,
                path: Path) -> None:
    """A 4x4 grid of EMA samples for the vocabulary prompts in `GRID_PROMPTS` (progress monitoring)."""
    from spectral_diffusion.toyworld.evaluate import image_grid

    view = StableDiffusionPipeline(vae=pipe.vae, text_encoder=text_encoder, tokenizer=pipe.tokenizer, unet=unet,
                                   scheduler=toy_model.sampling_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    view.set_progress_bar_config(disable=True)
    images = view(list(GRID_PROMPTS[:16]), num_inference_steps=20, guidance_scale=4.0,
                  generator=torch.Generator().manual_seed(0)).images
    image_grid(images, columns=4).save(path)


def export_pipeline(pipe: StableDiffusionPipeline, out_dir: Path) -> None:
    """Write `pipe` as a diffusers folder, replacing `out_dir` only once fully written. The UNet and VAE are stored in
    fp16 (diffusers loads them in fp32 unless asked otherwise); the text encoder in fp32, since transformers loads it
    in its stored dtype, and an fp16 text encoder beside an fp32 UNet fails in plain `from_pretrained` on a CPU.
    The concept recipe goes beside the weights (`training_defaults.json`, which the app trains with)."""

    export = copy.deepcopy(pipe).to(torch.float16)
    export.text_encoder.to(torch.float32)
    with atomic_directory(out_dir) as tmp:
        export.save_pretrained(tmp, safe_serialization=True)
        (Path(tmp) / TRAINING_DEFAULTS_FILE).write_text(json.dumps(RECIPE.training_defaults(), indent=2) + "\n")


def pretrain(cfg: PretrainConfig) -> Path:
    """Run (or resume) both stages and export the pipeline to `cfg.model_dir`; returns that folder."""
    cfg.out = Path(cfg.out)
    if cfg.out.exists() and any(cfg.out.glob("*.ckpt")) and not cfg.resume:
        raise SpectralDiffusionError(f"{cfg.out} already holds checkpoints: pass --resume or choose another --out")
    if cfg.vae_from is not None:
        vae_weights(cfg.vae_from)
    if not 0.0 <= cfg.pattern_share <= 1.0:
        raise SpectralDiffusionError(f"--pattern-share must be between 0 and 1, not {cfg.pattern_share}")
    if cfg.noise_draws < 1:
        raise SpectralDiffusionError(f"--noise-draws must be at least 1, not {cfg.noise_draws}")
    if cfg.unet_batch % cfg.noise_draws:
        raise SpectralDiffusionError(f"--unet-batch {cfg.unet_batch} is not a multiple of --noise-draws "
                                     f"{cfg.noise_draws}")
    init = load_init(cfg.init_from) if cfg.init_from is not None else None
    cfg.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    log = Logger(cfg.out / "log.txt")
    (cfg.out / "config.json").write_text(json.dumps(asdict(cfg), default=str, indent=2))
    start = time.perf_counter()
    torch.manual_seed(cfg.seed + 1)
    pipe = toy_model.build_pipeline(cfg.out / "tokenizer").to(cfg.device)
    specs, pixels = scene_dataset(cfg.num_scenes, cfg.seed, cfg.pattern_share)
    log(f"rendered {len(specs)} scenes in {time.perf_counter() - start:.1f} s")

    if cfg.vae_from is not None:
        vae, vae_id = import_vae(cfg.vae_from, cfg.device)
        log(f"vae: reused from {cfg.vae_from} ({vae_id}), held-out PSNR "
            f"{vae_psnr(vae, pixels[-256:].float().div(127.5).sub(1.0).to(cfg.device)):.2f} dB")
    else:
        vae, vae_id = train_vae(cfg, pixels, log)
    vae.requires_grad_(False)
    scenes_id = f"{vae_id}|scenes {cfg.num_scenes} seed {cfg.seed} patterned {cfg.pattern_share}"
    latents = encode_scenes(vae, scenes_id, pixels, cfg.out / "latents.pt", log)
    scale = 1.0 / latents["mean"].float().std().item()
    log(f"latent scaling factor {scale:.4f}")

    if init is not None:
        pipe.unet.load_state_dict(init.unet.state_dict())
        pipe.text_encoder.load_state_dict(init.text_encoder.state_dict())
        log(f"unet + text encoder: starting from {cfg.init_from}")
    pipe.vae = vae.to(memory_format=torch.contiguous_format)
    pipe.vae.register_to_config(scaling_factor=scale)
    ema_unet, ema_text = train_unet(cfg, pipe, specs, latents, log)
    pipe.unet, pipe.text_encoder = ema_unet.to(memory_format=torch.contiguous_format), ema_text
    export_pipeline(pipe, cfg.model_dir)
    log(f"exported the pipeline to {cfg.model_dir} ({(time.perf_counter() - start) / 60:.1f} min this run)")
    return Path(cfg.model_dir)
