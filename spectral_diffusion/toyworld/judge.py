"""The judge: a small CNN that reads toy-world images, trained only on renders, never on model outputs.

It predicts four things for a 64x64 image: which held-out concept it shows (or "none"), the base shape (a concept
counts as its class word's shape), the object colour (only learned on plain scenes) and the background. Scores built
on it measure identity retention and prompt fidelity without any pretrained network.

Training (`train_judge`) draws fresh renders every step, half base-world scenes (plain or in a pattern,
labelled "none") and half concept photos on every background, with augmentation that mimics generated images: Gaussian noise, blur, colour jitter, JPEG
compression, small shifts and zooms, and optionally a pass through the toy model's VAE (encode + decode of renders:
its colour shifts and softness, not model generations).

API:
    Judge.load(path=JUDGE_PATH) -> Judge
    judge.predict(images) -> {"concept"|"shape"|"colour"|"background": probabilities [n, classes]}
    judge.identity_score(images, concept) -> float          # mean probability of the intended concept
    judge.background_match(images, background) -> float     # mean probability of the asked background
    judge.shape_colour_background_accuracy(images, specs) -> {"shape", "colour", "background", "all": float}
    train_judge(out=JUDGE_PATH, steps=..., vae=None, seed=0, log=print) -> validation accuracies per head
`images` is a list of PIL images or a float tensor [n, 3, 64, 64] in [-1, 1].
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from spectral_diffusion.atomic import atomic_write
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.toyworld import concepts, render

JUDGE_PATH = Path(__file__).resolve().parent / "judge.safetensors"
NONE = "none"
LABELS: dict[str, tuple[str, ...]] = {
    "concept": (NONE, *concepts.CONCEPTS),
    "shape": render.SHAPES,
    "colour": tuple(render.COLOURS),
    "background": render.BACKGROUNDS,
}
CHANNELS = (32, 48, 96, 128)
IGNORE = -100  # label of a head that does not apply (the colour of a multi-coloured concept)


class JudgeNet(nn.Module):
    """Four stride-2 conv stages (64 -> 4 px), global pooling, one linear head per question."""

    def __init__(self, channels: Sequence[int] = CHANNELS) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 3
        for k, out in enumerate(channels):
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            if k < 2:  # an extra conv at 32 and 16 px, where patterns and edges are read
                layers += [nn.Conv2d(out, out, 3, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            width = out
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(width * 2, len(labels)) for name, labels in LABELS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return {name: head(pooled) for name, head in self.heads.items()}


def _as_tensor(images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images.float()
    if not images:
        raise SpectralDiffusionError("the judge needs at least one image")
    return render.to_tensor([img.convert("RGB").resize((render.RESOLUTION,) * 2) for img in images])


class Judge:
    """A trained `JudgeNet` with probability-level scores (see the module docstring)."""

    def __init__(self, net: JudgeNet) -> None:
        self.net = net.eval()

    @classmethod
    def load(cls, path: str | Path = JUDGE_PATH) -> Judge:
        path = Path(path)
        if not path.is_file():
            raise SpectralDiffusionError(f"no judge weights at {path}: run `spectral-diffusion toyworld train-judge`")
        meta = json.loads(path.with_suffix(".json").read_text())
        if {k: tuple(v) for k, v in meta["labels"].items()} != LABELS:
            raise SpectralDiffusionError(f"{path} was trained for other labels; retrain the judge")
        net = JudgeNet(meta["channels"])
        net.load_state_dict(load_file(path))
        return cls(net)

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image] | torch.Tensor) -> dict[str, torch.Tensor]:
        x = _as_tensor(images)
        logits = [self.net(chunk) for chunk in x.split(256)]
        return {name: torch.cat([out[name] for out in logits]).softmax(dim=1) for name in LABELS}

    def _mean_prob(self, images: Sequence[Image.Image] | torch.Tensor, head: str, label: str) -> float:
        if label not in LABELS[head]:
            raise SpectralDiffusionError(f"unknown {head} {label!r}; choose from {', '.join(LABELS[head])}")
        return self.predict(images)[head][:, LABELS[head].index(label)].mean().item()

    def identity_score(self, images: Sequence[Image.Image] | torch.Tensor, concept: str) -> float:
        """Mean probability that the images show `concept` (a name in `concepts.CONCEPTS`)."""
        return self._mean_prob(images, "concept", concept)

    def background_match(self, images: Sequence[Image.Image] | torch.Tensor, background: str) -> float:
        """Mean probability that the images' background is `background`."""
        return self._mean_prob(images, "background", background)

    def shape_colour_background_accuracy(self, images: Sequence[Image.Image] | torch.Tensor,
                                         specs: Sequence[render.SceneSpec]) -> dict[str, float]:
        """Fraction of images whose predicted shape / colour / background (and all three) match their spec."""
        probs = self.predict(images)
        if len(specs) != len(probs["shape"]):
            raise SpectralDiffusionError(f"{len(specs)} specs for {len(probs['shape'])} images")
        hits = {}
        for head, attr in (("shape", "shape"), ("colour", "colour"), ("background", "background")):
            wanted = torch.tensor([LABELS[head].index(getattr(s, attr)) for s in specs])
            hits[head] = probs[head].argmax(dim=1) == wanted
        hits["all"] = hits["shape"] & hits["colour"] & hits["background"]
        return {head: h.float().mean().item() for head, h in hits.items()}


def sample_example(rng: random.Random) -> tuple[Image.Image, dict[str, int]]:
    """A fresh render and its labels: half the time a concept on any background, else a scene of the base world
    (concept "none"): plain, or a quarter of the time in a pattern (no colour label), never a concept's
    look-alike, as pretraining draws them. Ordinary patterned things are thus not concepts to the judge."""
    if rng.random() < 0.5:
        patterned = rng.random() < 0.25
        spec = render.sample_patterned_spec(rng, concepts.is_lookalike) if patterned else render.sample_spec(rng)
        return render.render_scene(spec), {
            "concept": 0, "shape": render.SHAPES.index(spec.shape),
            "colour": IGNORE if patterned else LABELS["colour"].index(spec.colour),
            "background": render.BACKGROUNDS.index(spec.background)}
    name = rng.choice(tuple(concepts.CONCEPTS))
    background = rng.choice(render.BACKGROUNDS)
    image = concepts.render_concept(name, rng, background=background)
    return image, {"concept": LABELS["concept"].index(name),
                   "shape": render.SHAPES.index(concepts.CONCEPTS[name].class_word),
                   "colour": IGNORE, "background": render.BACKGROUNDS.index(background)}


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Generation-like corruptions on a batch in [-1, 1]: shift/zoom, blur, colour jitter, noise."""
    n = len(x)

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen)

    # Affine: zoom 0.9-1.1, shift up to 4 px (reflect padding keeps backgrounds plausible).
    theta = torch.zeros(n, 2, 3)
    scale = 0.9 + 0.2 * u(n)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = (u(n, 2) - 0.5) * 0.25
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)
    # Blur a third of the images with a 3x3 binomial kernel.
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    x = torch.where((u(n) < 0.33)[:, None, None, None], blurred, x)
    # Colour: per-channel gain and offset, global contrast.
    gain = 1 + (u(n, 3, 1, 1) - 0.5) * 0.16
    offset = (u(n, 3, 1, 1) - 0.5) * 0.12
    contrast = 1 + (u(n, 1, 1, 1) - 0.5) * 0.2
    x = (x * gain + offset) * contrast
    x = x + torch.randn(x.shape, generator=gen) * (u(n, 1, 1, 1) * 0.08)
    return x.clamp(-1, 1)


def make_batch(rng: random.Random, gen: torch.Generator, size: int,
               vae: torch.nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """An augmented training batch; a quarter of it goes through `vae` (encode + decode) when one is given."""
    images, labels = zip(*(sample_example(rng) for _ in range(size)), strict=True)
    images = [_jpeg(img, rng.randint(40, 95)) if rng.random() < 0.3 else img for img in images]
    x = render.to_tensor(images)
    if vae is not None:
        k = size // 4
        with torch.no_grad():
            x[:k] = vae.decode(vae.encode(x[:k]).latent_dist.mean).sample.clamp(-1, 1)
    target = {head: torch.tensor([lab[head] for lab in labels]) for head in LABELS}
    return augment(x, gen), target


def accuracy(net: JudgeNet, x: torch.Tensor, target: dict[str, torch.Tensor]) -> dict[str, float]:
    with torch.no_grad():
        logits = net(x)
    result = {}
    for head in LABELS:
        valid = target[head] != IGNORE
        result[head] = (logits[head].argmax(1)[valid] == target[head][valid]).float().mean().item()
    return result


def train_judge(out: str | Path = JUDGE_PATH, steps: int = 1500, batch: int = 96, lr: float = 2e-3,
                vae: torch.nn.Module | None = None, seed: int = 0,
                log: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """Train a judge from scratch, write `out` (+ `.json` config) atomically, return validation accuracies.

    Validation uses 512 renders from another seed: clean, augmented, and (with `vae`) VAE-reconstructed.
    """
    torch.manual_seed(seed)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    net = JudgeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        x, target = make_batch(rng, gen, batch, vae)
        logits = net(x)
        loss = sum(F.cross_entropy(logits[h], target[h], ignore_index=IGNORE) for h in LABELS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            log(f"judge step {step + 1}/{steps} loss {loss.item():.4f}")
    net.eval()
    val_rng, val_gen = random.Random(seed + 10_000), torch.Generator().manual_seed(seed + 10_000)
    images, labels = zip(*(sample_example(val_rng) for _ in range(512)), strict=True)
    clean = render.to_tensor(list(images))
    target = {head: torch.tensor([lab[head] for lab in labels]) for head in LABELS}
    report = {"clean": accuracy(net, clean, target), "augmented": accuracy(net, augment(clean, val_gen), target)}
    if vae is not None:
        with torch.no_grad():
            recon = torch.cat([vae.decode(vae.encode(c).latent_dist.mean).sample.clamp(-1, 1)
                               for c in clean.split(128)])
        report["vae"] = accuracy(net, recon, target)
    _save(net, Path(out), report)
    return report


def _save(net: JudgeNet, path: Path, report: dict) -> None:
    meta = {"channels": list(CHANNELS), "labels": {k: list(v) for k, v in LABELS.items()}, "validation": report}
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
    atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
