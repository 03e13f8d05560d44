"""Train one concept: adapters in one SVD band + new token embeddings, from a photo folder, into a concept file.

Only the adapter's trainable tensors and the new tokens' embedding rows change; every base weight stays
bit-identical. The loop runs under `accelerate` (gradient accumulation, mixed precision, and multi-GPU data
parallel when started with `accelerate launch`). Everything random in a step (data order, crops, flips, VAE
sampling, noise, timesteps) is drawn from a generator of its own sample, seeded by (seed, the sample's global index), so a
run with P processes of batch B draws exactly what one process of batch P*B draws, and a run resumed from
a checkpoint ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import copy
import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import compute_snr
from diffusers.utils import make_image_grid
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from safetensors import SafetensorError
from torch import nn

from spectral_diffusion.adapters import (
    adapter_layers,
    adapter_state,
    conv_kernels,
    inject_adapters,
    remove_adapters,
    trainable_parameters,
)
from spectral_diffusion.adapters.inject import adapter_disabled
from spectral_diffusion.adapters.targets import is_text_fed
from spectral_diffusion.band_registry import choose_band
from spectral_diffusion.bands import band_columns
from spectral_diffusion.concept_file import Concept, ConceptMeta, save_concept
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.fingerprint import base_fingerprint
from spectral_diffusion.generation import GenerationSettings, generate, native_size, save_png
from spectral_diffusion.models import DTYPES
from spectral_diffusion.progress import StepProgress
from spectral_diffusion.prompts import read_prompts
from spectral_diffusion.sidecar import write_sidecar
from spectral_diffusion.tokens import (
    ConceptEmbeddings,
    add_concept_tokens,
    check_new_token,
    default_norm_cap,
    drop_token,
    expand_prompt,
    initial_embeddings,
    resize_embeddings,
    token_ids,
)
from spectral_diffusion.training.checkpoint import (
    check_same_settings,
    checkpoint_dir,
    load_latest,
    save_checkpoint,
    set_rng_states,
)
from spectral_diffusion.training.config import TrainConfig, loss_log_path, preview_path
from spectral_diffusion.training.data import (
    CONCEPT_TEMPLATE,
    PRIOR_TEMPLATE,
    ExampleSet,
    fill_caption,
    load_folder,
    sample_order,
)

log = logging.getLogger(__name__)

ADAPTER_NAME = "concept"
_PRIOR_SEED_OFFSET = 1_000_003  # the prior images get their own order stream


@dataclass(frozen=True)
class StepInfo:
    """What `on_step` callbacks get after every optimizer step (the app draws its progress bar from it)."""

    step: int
    steps: int
    loss: float
    lr: float


class DiffusionObjective(nn.Module):
    """The trainable forward: concept rows into the text encoder, then the UNet's prediction.

    One module, so that `accelerate` wraps the UNet, the text encoder and the embedding rows together for data
    parallel training; the base weights inside are frozen.
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, embeddings: ConceptEmbeddings):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.embeddings = embeddings

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.text_encoder(input_ids)[0]
        return self.unet(noisy, timesteps, encoder_hidden_states=hidden).sample


def masked_mse(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor, floor: float) -> torch.Tensor:
    """Per-sample MSE in latent space weighted by the subject mask (area-downsampled), `floor` for background."""
    weight = floor + (1 - floor) * F.interpolate(masks.float(), size=pred.shape[-2:], mode="area")
    err = (pred.float() - target.float()).square() * weight
    return err.sum((1, 2, 3)) / (weight.sum((1, 2, 3)) * pred.shape[1]).clamp_min(1e-8)


def locality_prompts(config: TrainConfig) -> list[str] | None:
    """The kinds of prompt the locality term holds at the base's outputs (`Trainer.locality_loss`; None without
    the term), as the concept file records them: a concept trained with another term (before the empty prompt was
    added) is told apart, so the demo and the benchmarks do not reuse it and a checkpoint of it does not resume."""
    if config.locality_weight <= 0:
        return None
    return ["token dropped", "empty prompt", "foreign token"] + (["ordinary captions"] if config.locality_captions else [])


def locality_captions(config: TrainConfig) -> list[str]:
    """The ordinary captions the locality term draws from (`--locality-captions`, the concept's token dropped where
    a line holds it); recorded in the concept file, whose closed-form fusion then keeps them at the base's mapping."""
    if config.locality_weight <= 0 or config.locality_captions is None:
        return []
    captions = read_prompts(config.locality_captions, "--locality-captions")
    return [drop_token(c, config.token) for c in captions]


def relative_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE relative to the target's mean square: layers of any scale weigh alike."""
    return F.mse_loss(pred.float(), target.float()) / target.float().square().mean().clamp_min(1e-12)


def snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(snr, gamma) / snr for epsilon targets, and
    min(snr, gamma) / (snr + 1) for v targets, whose MSE is already (snr + 1) times the epsilon MSE."""
    snr = compute_snr(scheduler, timesteps)
    clipped = snr.clamp(max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def sample_generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """The CPU generator of one training sample: a pure function of (seed, the sample's global index, stream), so the
    draws do not depend on how samples are split into processes and micro-batches (stream 1: prior images)."""
    state = np.random.SeedSequence([seed, index, stream]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0]) >> 1)


@contextmanager
def deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """First Ctrl-C only sets a flag (read by the loop at a step boundary); a second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    flag = {"set": False}

    def handler(signum: int, frame: Any) -> None:
        if flag["set"]:
            raise KeyboardInterrupt
        flag["set"] = True
        log.warning("stopping after this step to write a checkpoint (Ctrl-C again to stop at once)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: flag["set"]
    finally:
        signal.signal(signal.SIGINT, previous)


def _accelerator(mixed_precision: str, grad_accum: int, cpu: bool) -> Accelerator:
    """An Accelerator; in a single process (the app) a later run may change precision or device, which accelerate's
    process-wide state refuses, so that state is reset first (never under `accelerate launch`)."""
    try:
        return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum, cpu=cpu)
    except ValueError as exc:
        if "already been initialized" not in str(exc) or PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum, cpu=cpu)


class Trainer:
    """One training run. `Trainer(config).run()` (or `train(config)`) writes the concept file and returns its path.

    `pipe` lets a caller that already holds the base model train on it instead of loading `config.base` again: a
    plain base (no live concepts), changed in place while training and handed back as it came when `run` ends,
    however it ends (adapter, token and embedding rows taken off; its weights stay frozen), ready for the next run
    or for loading the new concept (`pipeline.load_concept_weights`).
    """

    def __init__(self, config: TrainConfig, pipe: StableDiffusionPipeline | None = None,
                 on_step: Callable[[StepInfo], None] | None = None):
        config.check()
        self.config = config
        self.locality_captions = locality_captions(config)
        self.on_step = on_step
        self.out = Path(config.out)
        self.ckpt_dir = checkpoint_dir(self.out)
        if self.ckpt_dir.exists() and not config.resume:
            if not config.overwrite:
                raise SpectralDiffusionError(
                    f"{self.ckpt_dir} holds checkpoints of an earlier run: pass --resume to continue it "
                    "or --overwrite to start over")
            shutil.rmtree(self.ckpt_dir)
        device = config.base.device
        on_cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
        mixed = config.mixed_precision
        if on_cpu and mixed != "no":
            log.warning("--mixed-precision %s needs a GPU: training in fp32 on the CPU", mixed)
            mixed = "no"
        self.accelerator = _accelerator(mixed, config.grad_accum, on_cpu)
        dtype = config.base.dtype or {"no": "fp32"}.get(mixed, mixed)
        self.weight_dtype = DTYPES[dtype]
        self.checkpoint = load_latest(self.ckpt_dir) if config.resume else None
        if config.resume and self.checkpoint is None:
            log.warning("no checkpoint in %s: starting from the beginning", self.ckpt_dir)
        self._given: tuple[Any, int] | None = None  # a caller's pipeline: its tokenizer and embedding rows
        if pipe is None:
            base = replace(config.base, device=str(self.accelerator.device), dtype=dtype).load()
            pipe, self.fingerprint = base.pipe, base.fingerprint
        else:
            if adapter_layers(pipe.unet, pipe.text_encoder):
                raise SpectralDiffusionError("the pipeline has live concepts or adapters; train on the plain base "
                                             "(pipeline.unload_concept_weights(pipe))")
            pipe.to(self.accelerator.device)
            self.weight_dtype = pipe.unet.dtype
            self._given = (copy.deepcopy(pipe.tokenizer), pipe.text_encoder.get_input_embeddings().num_embeddings)
            self.fingerprint = base_fingerprint(pipe.unet, pipe.text_encoder)
        self.pipe = pipe
        try:
            self._setup()
        except BaseException:
            self._hand_back()
            raise

    # ---- setup ---------------------------------------------------------------------------------------------

    def _setup(self) -> None:
        config, pipe = self.config, self.pipe
        self.resolution = self._resolution()
        check_new_token(pipe.tokenizer, config.token, config.num_vectors)
        self.data = ExampleSet(load_folder(config.photo_dir, self.resolution, config.token, config.class_word,
                                           CONCEPT_TEMPLATE), self.resolution, config.flip)
        self.prior = None if config.prior_dir is None else ExampleSet(
            load_folder(config.prior_dir, self.resolution, "", config.class_word, PRIOR_TEMPLATE),
            self.resolution, config.flip)
        self.spectral = config.adapter_config(0).spectral
        self.band = self._band()
        for model in (pipe.unet, pipe.text_encoder, pipe.vae):
            model.requires_grad_(False)
        self.wrappers = inject_adapters(pipe.unet, pipe.text_encoder, config.adapter_config(self.band),
                                        name=ADAPTER_NAME)
        generator = torch.Generator().manual_seed(config.seed)
        init = initial_embeddings(pipe.tokenizer, pipe.text_encoder, config.class_word, config.num_vectors, generator)
        self.norm_cap = default_norm_cap(pipe.text_encoder) if config.emb_norm_cap is None else config.emb_norm_cap
        self.token_names = add_concept_tokens(pipe.tokenizer, pipe.text_encoder, config.token, init)
        embedding = pipe.text_encoder.get_input_embeddings()
        self.embeddings = ConceptEmbeddings(embedding, token_ids(pipe.tokenizer, self.token_names), init)
        self.embeddings.to(embedding.weight.device)
        if config.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            pipe.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        prediction = self.noise_scheduler.config.prediction_type
        if prediction not in ("epsilon", "v_prediction"):
            raise SpectralDiffusionError(
                f"the base model's scheduler predicts {prediction!r}; only epsilon and v_prediction models train")
        self.objective = DiffusionObjective(pipe.unet, pipe.text_encoder, self.embeddings)
        self.optimizer = torch.optim.AdamW(self._param_groups())
        self.warmup = config.steps // 20 if config.warmup_steps is None else config.warmup_steps
        self.lr_scheduler = get_cosine_schedule_with_warmup(self.optimizer, self.warmup, config.steps)
        self.model, self.optimizer = self.accelerator.prepare(self.objective, self.optimizer)
        self.trainables = {n: p for n, p in self.objective.named_parameters() if p.requires_grad}
        self.start_step = 0
        if self.checkpoint is not None:
            self._restore(self.checkpoint)

    def _resolution(self) -> int:
        native = native_size(self.pipe)[0]
        resolution = self.config.resolution or native
        multiple = self.pipe.vae_scale_factor * 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)
        if resolution % multiple:
            raise SpectralDiffusionError(f"--resolution {resolution} must be a multiple of {multiple} for this model")
        return resolution

    def _band(self) -> int:
        """The band of the checkpoint being resumed, else `--band` (auto: the next free one for this base)."""
        config = self.config
        if self.checkpoint is not None:
            return int(self.checkpoint["settings"]["band"])
        if not self.spectral:
            if config.band != "auto":
                log.warning("--band is ignored by the %s variant, which does not use SVD bands", config.variant)
            return 0
        band = choose_band(config.band, config.rank, self.fingerprint, self.out, config.concepts_dir)
        columns = band_columns(band, config.rank)
        log.info("training %s in band %d (singular vectors %d..%d of every targeted layer)",
                 config.token, band, columns.start, columns.stop - 1)
        return band

    def _param_groups(self) -> list[dict]:
        lr_unet, lr_text, lr_emb = self.config.learning_rates()
        decay = self.config.weight_decay
        by_part = {part: {k: v for k, v in self.wrappers.items() if k.startswith(part + ".")}
                   for part in ("unet", "text_encoder")}
        groups = [
            {"params": trainable_parameters(by_part["unet"], ADAPTER_NAME), "lr": lr_unet, "weight_decay": decay},
            {"params": trainable_parameters(by_part["text_encoder"], ADAPTER_NAME), "lr": lr_text,
             "weight_decay": decay},
            {"params": [self.embeddings.rows], "lr": lr_emb, "weight_decay": 0.0},
        ]
        for group in groups:
            if group["lr"] == 0:
                for p in group["params"]:
                    p.requires_grad_(False)  # frozen, not "trained with lr 0": it must stay bit-identical
        kept = [g for g in groups if g["params"] and g["lr"] > 0]
        if not kept:
            raise SpectralDiffusionError("nothing to train: every learning rate is 0")
        return kept

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """The training settings stored in the concept file; resuming requires all of them unchanged."""
        c = self.config
        lr_unet, lr_text, lr_emb = c.learning_rates()
        return {
            "base_fingerprint": self.fingerprint, "token": c.token, "class_word": c.class_word,
            "variant": c.variant, "band": self.band, "rank": c.rank, "targets": c.targets,
            "train_singular_values": c.train_singular_values, "steps": c.steps, "batch_size": c.batch_size,
            "grad_accum": c.grad_accum, "resolution": self.resolution, "lr_unet": lr_unet, "lr_text": lr_text,
            "lr_emb": lr_emb, "warmup_steps": self.warmup, "weight_decay": c.weight_decay,
            "max_grad_norm": c.max_grad_norm, "seed": c.seed, "noise_offset": c.noise_offset,
            "snr_gamma": c.snr_gamma, "locality_weight": c.locality_weight,
            "locality_prompts": locality_prompts(c), "num_vectors": c.num_vectors,
            # only where given: concepts and checkpoints from before the option compare equal without them
            **({"locality_captions": self.locality_captions} if self.locality_captions else {}),
            "emb_norm_cap": self.norm_cap,
            "prior_weight": c.prior_weight if self.prior else 0.0, "mask_floor": c.mask_floor, "flip": c.flip,
            "images": [e.name for e in self.data.examples],
            "captions": sorted({e.caption for e in self.data.examples}),  # what closed-form fusion re-encodes
            "prior_images": len(self.prior) if self.prior else 0,
            "processes": self.accelerator.num_processes,
        }

    def _save_checkpoint(self, step: int) -> None:
        """Main process only, no barrier: data-parallel replicas hold identical weights, and a crash path must not
        wait for processes that may be gone."""
        if not self.accelerator.is_main_process:
            return
        state = {
            "settings": self.settings(),
            "trainables": {n: p.detach().cpu().clone() for n, p in self.trainables.items()},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
        }
        if self.accelerator.scaler is not None:
            state["scaler"] = self.accelerator.scaler.state_dict()
        save_checkpoint(self.ckpt_dir, step, state)

    def _restore(self, state: dict[str, Any]) -> None:
        check_same_settings(state["settings"], self.settings(), self.ckpt_dir)
        trainables = self.trainables
        if set(trainables) != set(state["trainables"]):
            raise SpectralDiffusionError(f"checkpoint {state['path']} does not match this model's adapters")
        with torch.no_grad():
            for name, param in trainables.items():
                param.copy_(state["trainables"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if "scaler" in state and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"])
        self.start_step = int(state["step"])
        log.info("resuming from %s (step %d of %d)", state["path"], self.start_step, self.config.steps)

    # ---- the loop ------------------------------------------------------------------------------------------

    def _encode_captions(self, captions: list[str]) -> torch.Tensor:
        tokenizer = self.pipe.tokenizer
        return tokenizer(expand_prompt(tokenizer, captions), padding="max_length", truncation=True,
                         max_length=tokenizer.model_max_length, return_tensors="pt").input_ids

    def _batch(self, micro_step: int) -> tuple[dict, list[torch.Generator]]:
        """`batch_size` concept images, then as many prior images if there is a prior folder, with one generator per
        image (what every later draw for that image uses)."""
        size, seed = self.config.batch_size, self.config.seed
        slot = (micro_step * self.accelerator.num_processes + self.accelerator.process_index) * size
        generators = [sample_generator(seed, slot + i) for i in range(size)]
        batch = self.data.batch(sample_order(len(self.data), seed, slot, size), generators)
        if self.prior is not None:
            prior_generators = [sample_generator(seed, slot + i, stream=1) for i in range(size)]
            prior_order = sample_order(len(self.prior), seed + _PRIOR_SEED_OFFSET, slot, size)
            prior = self.prior.batch(prior_order, prior_generators)
            batch = {k: torch.cat([batch[k], prior[k]]) if k != "captions" else batch[k] + prior[k] for k in batch}
            generators += prior_generators
        return batch, generators

    def _loss(self, micro_step: int) -> torch.Tensor:
        batch, generators = self._batch(micro_step)
        device, vae = self.accelerator.device, self.pipe.vae
        with torch.no_grad():
            pixels = batch["pixel_values"].to(device, vae.dtype)
            latents = vae.encode(pixels).latent_dist.sample(generators) * vae.config.scaling_factor
        latents = latents.float()
        noise = randn_tensor(latents.shape, generator=generators, device=device)
        if self.config.noise_offset:
            offset = randn_tensor(latents.shape[:2] + (1, 1), generator=generators, device=device)
            noise = noise + self.config.noise_offset * offset
        schedule = self.noise_scheduler
        timesteps = torch.cat([torch.randint(0, schedule.config.num_train_timesteps, (1,), generator=g)
                               for g in generators]).to(device)
        noisy = schedule.add_noise(latents, noise, timesteps)
        v_prediction = schedule.config.prediction_type == "v_prediction"
        target = schedule.get_velocity(latents, noise, timesteps) if v_prediction else noise
        input_ids = self._encode_captions(batch["captions"]).to(device)
        pred = self.model(noisy.to(self.weight_dtype), timesteps, input_ids)
        per_sample = masked_mse(pred, target, batch["masks"].to(device), self.config.mask_floor)
        if self.config.snr_gamma > 0:
            per_sample = per_sample * snr_weights(schedule, timesteps, self.config.snr_gamma)
        n = self.config.batch_size
        loss = per_sample[:n].mean()
        if self.prior is not None:
            loss = loss + self.config.prior_weight * per_sample[n:].mean()
        if self.config.locality_weight > 0:
            loss = loss + self.config.locality_weight * self.locality_loss(batch["captions"][:n], generators[0])
        return loss

    def locality_loss(self, captions: list[str], generator: torch.Generator) -> torch.Tensor:
        """Text-side interference control: on prompts that do not carry this concept's token, the adapted text
        encoder and cross-attention keys/values give the base model's outputs (relative MSE, averaged over them).

        Four kinds of such prompts: this step's captions with the token dropped, the empty prompt (the
        unconditional branch of classifier-free guidance), as many ordinary captions of the base's domain drawn
        at random (`--locality-captions`, where given: without them the term sees only prompts shaped like the
        concept's own, and the concept may move every other caption, which closed-form fusion must then undo), and
        the captions with the token's vectors replaced by random ones of the same norms (a foreign token: what
        another concept puts there once fused). Needs text encodings only, no UNet pass; only the adapters get its
        gradient.
        """
        token, device = self.config.token, self.accelerator.device
        # the empty prompt is classifier-free guidance's unconditional branch, which every concept of a fused model
        # shares: a concept that moves it pulls every other concept's images with it
        ordinary = [drop_token(c, token) for c in captions] + [""]
        if self.locality_captions:
            drawn = torch.randint(len(self.locality_captions), (len(captions),), generator=generator)
            ordinary += [self.locality_captions[i] for i in drawn.tolist()]
        ids = self._encode_captions(ordinary + captions).to(device)
        rows = self.embeddings.rows.detach()
        foreign = torch.randn(rows.shape, generator=generator).to(rows)
        foreign = foreign * rows.norm(dim=1, keepdim=True) / foreign.norm(dim=1, keepdim=True)
        encoder = self.pipe.text_encoder
        kv = [w for name, w in self.wrappers.items() if name.startswith("unet.") and is_text_fed(name)]

        def encode() -> torch.Tensor:
            with self.embeddings.replaced(foreign):
                return encoder(ids)[0]  # ordinary prompts hold no token: the replacement acts on the others only

        with torch.no_grad(), adapter_disabled(self.wrappers, ADAPTER_NAME):
            base = encode()
            base_kv = [w.base(base) for w in kv]
        adapted = encode()
        terms = [relative_mse(adapted, base)]
        terms += [relative_mse(w(adapted), b) for w, b in zip(kv, base_kv, strict=True)]
        return torch.stack(terms).mean()

    def _train_step(self, step: int) -> float:
        """One optimizer step of `grad_accum` micro-batches; returns the mean loss."""
        losses = []
        for k in range(self.config.grad_accum):
            with self.accelerator.accumulate(self.model):
                loss = self._loss(step * self.config.grad_accum + k)
                self.accelerator.backward(loss)
                losses.append(float(loss.detach()))
                if self.accelerator.sync_gradients and self.config.max_grad_norm > 0:
                    self.accelerator.clip_grad_norm_(list(self.trainables.values()), self.config.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        if self.norm_cap > 0:
            self.embeddings.cap_norms(self.norm_cap)
        return sum(losses) / len(losses)

    def _hand_back(self) -> None:
        """A caller's pipeline as it came: no adapter, embedding hook, token or embedding row of this run."""
        if self._given is None:
            return
        tokenizer, rows = self._given
        if hasattr(self, "embeddings"):
            self.embeddings.remove()
        remove_adapters(self.pipe.unet, self.pipe.text_encoder)
        self.pipe.tokenizer = tokenizer
        resize_embeddings(self.pipe.text_encoder, rows)
        self._given = None

    def run(self) -> Path:
        """Train to `config.steps`, checkpointing on schedule and on Ctrl-C; write the concept; return its path."""
        try:
            return self._run()
        finally:
            self._hand_back()

    def _run(self) -> Path:
        config = self.config
        step = self.start_step
        bar = StepProgress(config.steps, initial=step, desc=f"training {config.token}",
                           enabled=self.accelerator.is_local_main_process)
        loss_log = self._open_loss_log()
        self.model.train()
        try:
            with deferred_interrupt() as interrupted:
                while step < config.steps:
                    started = time.perf_counter()
                    loss = self._train_step(step)
                    step += 1
                    lr = self.lr_scheduler.get_last_lr()[0]
                    bar.update(loss=loss, lr=lr)
                    if loss_log is not None:
                        loss_log.write(f"{step},{loss:.6g},{lr:.6g},{time.perf_counter() - started:.4f}\n")
                        loss_log.flush()
                    if self.on_step is not None:
                        self.on_step(StepInfo(step, config.steps, loss, lr))
                    if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                        self._save_checkpoint(step)
                    if config.validate_every and step % config.validate_every == 0 and config.validation_prompts:
                        self._validate(step)
                    if interrupted():
                        raise KeyboardInterrupt
        except BaseException:  # Ctrl-C, out of memory, a failing callback...: keep the steps done so far
            bar.close()
            if loss_log is not None:
                loss_log.close()
            if step > self.start_step:
                self._save_checkpoint(step)
                log.warning("stopped at step %d: checkpoint written to %s; the same command with --resume "
                            "continues from there", step, self.ckpt_dir)
            raise
        bar.close()
        if loss_log is not None:
            loss_log.close()
        return self._finish()

    def _open_loss_log(self) -> TextIO | None:
        """`<stem>.loss.csv` (step, loss, lr, seconds), for plotting; a resumed run keeps the rows of the steps
        it resumes from and continues them. Main process only."""
        if not self.accelerator.is_main_process:
            return None
        path = loss_log_path(self.out)
        header = "step,loss,lr,seconds\n"
        rows = []
        if self.start_step and path.is_file():
            rows = [r for r in path.read_text(encoding="utf-8").splitlines()[1:]
                    if r.split(",")[0].isdigit() and int(r.split(",")[0]) <= self.start_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        log_file = path.open("w", encoding="utf-8")
        log_file.write(header + "".join(r + "\n" for r in rows))
        return log_file

    # ---- samples and output --------------------------------------------------------------------------------

    def default_prompt(self) -> str:
        return fill_caption(CONCEPT_TEMPLATE, self.config.token, self.config.class_word)

    def _sample(self, prompt: str, n: int) -> list[Image.Image]:
        self.model.eval()
        try:
            settings = GenerationSettings(prompt=prompt, steps=self.config.sample_steps, seed=self.config.seed, n=n,
                                          size=(self.resolution, self.resolution), scheduler="ddim")
            return generate(self.pipe, settings, model=self.config.base.spec, concepts={self.config.token: 1.0})
        finally:
            self.model.train()

    def _validate(self, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        folder = self.out.with_name(self.out.stem + "_samples")
        for i, prompt in enumerate(self.config.validation_prompts):
            (sample,) = self._sample(prompt, 1)
            save_png(folder / f"step-{step:06d}-{i}.png", sample)

    def _finish(self) -> Path:
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return self.out
        self.embeddings.write()
        config = self.config
        layers = adapter_state(self.wrappers, ADAPTER_NAME)
        meta = ConceptMeta(variant=config.variant, rank=config.rank, band=self.meta_band, targets=config.targets,
                           base_fingerprint=self.fingerprint, token=config.token, token_names=self.token_names,
                           class_word=config.class_word, training=self.settings(),
                           kernels=conv_kernels(self.pipe.unet, self.pipe.text_encoder, layers))
        concept = Concept(meta=meta, layers=layers, token_embeddings=self.embeddings.rows.detach().float().cpu())
        try:
            save_concept(self.out, concept, overwrite=config.overwrite)
        except (OSError, SafetensorError) as exc:
            raise self._write_failed(exc) from None
        shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        log.info("wrote %s (trigger word: %s)", self.out, config.token)
        try:
            self._write_sidecar(meta, None)  # listable at once, even if the (slow) preview is interrupted
            preview = self._preview()
            if preview is not None:
                self._write_sidecar(meta, preview)
        except OSError as exc:  # the concept itself is written: nothing is lost
            log.warning("could not write the sidecar or preview of %s: %s", self.out.name, exc.strerror or exc)
        return self.out

    def _write_failed(self, exc: Exception) -> SpectralDiffusionError:
        """Keep the trained state as a checkpoint (if the disk still takes one) and say how to write it later."""
        try:
            self._save_checkpoint(self.config.steps)
        except Exception as ckpt_exc:  # a full disk fails this too: the last scheduled checkpoint stays
            log.warning("could not write a final checkpoint either: %s", ckpt_exc)
        latest = load_latest(self.ckpt_dir) if self.ckpt_dir.is_dir() else None
        reason = getattr(exc, "strerror", None) or str(exc)
        kept = (f"the training state of step {latest['step']} is kept in {self.ckpt_dir}: fix the cause and run the "
                "same command with --resume to write it" if latest else "no checkpoint could be kept")
        return SpectralDiffusionError(f"could not write {self.out} ({reason}); {kept}")

    @property
    def meta_band(self) -> int | None:
        """The band written to the concept file and sidecar: None for the band-less lora/ortho baselines."""
        return self.band if self.spectral else None

    def _preview(self) -> Path | None:
        """A grid of `preview_images` samples per prompt (validation prompts, else the default caption)."""
        n = self.config.preview_images
        if n == 0:
            return None
        prompts = list(self.config.validation_prompts) or [self.default_prompt()]
        images = [image for p in prompts for image in self._sample(p, n)]
        return save_png(preview_path(self.out), make_image_grid(images, rows=len(prompts), cols=n), "\n".join(prompts))

    def _write_sidecar(self, meta: ConceptMeta, preview: Path | None) -> None:
        write_sidecar(self.out, meta, example_prompt=self.default_prompt(),
                      base_model=_spec_for_listing(self.config.base.spec), steps=self.config.steps, images=len(self.data),
                      preview=preview)


def _spec_for_listing(spec: str) -> str:
    """A base given as a local path, made absolute so the sidecar stays valid from any working directory."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if spec != "toy" and path.exists() else spec


def train(config: TrainConfig, pipe: StableDiffusionPipeline | None = None,
          on_step: Callable[[StepInfo], None] | None = None) -> Path:
    """Train a concept as `config` says and return the path of the concept file written.

    `pipe`: the base model already loaded, trained on instead of loading `config.base` a second time and handed back
    unchanged (`Trainer`), so the new concept loads on it next: `load_concept_weights(pipe, train(config, pipe))`.
    """
    return Trainer(config, pipe, on_step).run()
