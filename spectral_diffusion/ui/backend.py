"""The app's state: one loaded pipeline with live concept composition, the concepts folder, one training job.

Everything here is plain Python (no Gradio), so it can be driven and tested without a browser. The pipeline is
shared by every browser session: a lock makes generations take turns (the app's queue also runs one at a time), and
composition is only changed under that lock. Training loads its own copy of the base model in a background thread,
so generating goes on while a concept trains.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

import pandas as pd
from diffusers import StableDiffusionPipeline
from PIL import Image

from spectral_diffusion.compose import Composer, check_weight
from spectral_diffusion.concept_file import canonical_token
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.export import Exported, export_lora, textual_inversion_path
from spectral_diffusion.fusion import FusionReport, fuse, save_fused
from spectral_diffusion.generation import GenerationSettings, generate, save_images, save_png
from spectral_diffusion.loras import set_loras
from spectral_diffusion.models import LoadedBase
from spectral_diffusion.pipeline import merge_weights, prompt_tags
from spectral_diffusion.training.config import PER_RUN_FIELDS, preview_path, recommended_settings
from spectral_diffusion.training.data import CONCEPT_TEMPLATE, fill_caption
from spectral_diffusion.training.trainer import StepInfo, TrainConfig, train
from spectral_diffusion.ui.concepts import ConceptInfo, list_concepts, read_concept_info
from spectral_diffusion.ui.uploads import check_images, child_path

log = logging.getLogger(__name__)

INTERNAL_ERROR = "unexpected internal error (details are in the server log)"


@dataclass
class TrainingJob:
    """A background training run and what the UI shows of it; fields are written by the job's thread only."""

    name: str
    steps: int
    step: int = 0
    loss: float | None = None
    error: str | None = None
    result: Path | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) of every step so far
    samples_dir: Path | None = None  # where the trainer writes its samples during training, if it samples
    started: float = field(default_factory=time.time)
    thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def loss_curve(self) -> pd.DataFrame:
        """The loss so far, one row per step (`step`, `loss`), for the Train tab's plot."""
        return pd.DataFrame(list(self.losses), columns=["step", "loss"])

    def samples(self) -> list[tuple[Path, int]]:
        """The samples this job wrote so far, with their step, oldest first (files of an earlier run are not)."""
        if self.samples_dir is None or not self.samples_dir.is_dir():
            return []
        found = []
        for path in sorted(self.samples_dir.glob("step-*.png")):
            try:
                if path.stat().st_mtime >= self.started - 1:
                    found.append((path, int(path.stem.split("-")[1])))
            except (OSError, ValueError, IndexError):
                continue
        return found

    def describe(self) -> str:
        """One line of status for the Train tab."""
        if self.error is not None:
            return f"Training {self.name} failed: {self.error}"
        if self.result is not None:
            return f"Trained {self.name}: {self.result.name} is in the concept list."
        loss = f", loss {self.loss:.4f}" if self.loss is not None else ""
        return f"Training {self.name}: step {self.step} of {self.steps}{loss}"


class _StepCounter:
    """Stands in for the tqdm bar a diffusers pipeline opens around its denoising loop (`update()` once a step)."""

    def __init__(self, total: int, on_step: Callable[[int, int], None]) -> None:
        self.total, self.step, self.on_step = total, 0, on_step

    def __enter__(self) -> _StepCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int = 1) -> None:
        self.step += n
        self.on_step(self.step, self.total)


@contextmanager
def report_steps(pipe: StableDiffusionPipeline, on_step: Callable[[int, int], None] | None) -> Iterator[None]:
    """Call `on_step(step, total)` after each denoising step of `pipe` inside the block.

    Every diffusers pipeline reports its steps through `self.progress_bar(total=...)`; shadowing that method on
    this instance reaches the step loop without changing the sampling code.
    """
    if on_step is None:
        yield
        return
    pipe.progress_bar = lambda iterable=None, total=None: _StepCounter(total, on_step)
    try:
        yield
    finally:
        del pipe.progress_bar


class Backend:
    """What the web UI calls: concepts, generation with live composition, training, fusion, LoRA export."""

    def __init__(self, loaded: LoadedBase, *, concepts_dir: str | Path, output_dir: str | Path) -> None:
        self.pipe = loaded.pipe
        self.base = loaded.spec  # training and fusion load this same model again
        self.concepts_dir = Path(concepts_dir).resolve()
        self.output_dir = Path(output_dir).resolve()
        self.concepts_dir.mkdir(parents=True, exist_ok=True)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.composer = Composer(self.pipe, fingerprint=loaded.fingerprint)
        self.fingerprint = self.composer.fingerprint
        self._pipe_lock = threading.Lock()
        self._job_lock = threading.Lock()
        self.job: TrainingJob | None = None
        self.train_defaults = recipe_for(self.base.spec)
        self._no_preview: set[Path] = set()  # concepts whose preview failed to render: not retried

    # ---- concepts ------------------------------------------------------------------------------------------

    def concepts(self) -> list[ConceptInfo]:
        return list_concepts(self.concepts_dir)

    def concepts_with_previews(self) -> list[ConceptInfo]:
        """The listing, a preview rendered first for each concept of the loaded base that has none (cards)."""
        return [self._with_preview(info) for info in self.concepts()]

    def _with_preview(self, info: ConceptInfo) -> ConceptInfo:
        if info.preview is not None or info.base_fingerprint != self.fingerprint or info.path in self._no_preview:
            return info
        try:
            return replace(info, preview=self.render_preview(info))
        except Exception:  # a card without a picture is no reason to fail the listing
            log.exception("could not render a preview of %s", info.name)
            self._no_preview.add(info.path)
            return info

    def render_preview(self, info: ConceptInfo) -> Path:
        """One image of the concept's trigger and class word on the loaded base (seed 0, its recommended weight),
        saved atomically beside it as `<name>.preview.png`, where the trainer puts its own preview; later listings
        read that file."""
        settings = GenerationSettings(prompt=fill_caption(CONCEPT_TEMPLATE, info.token, info.class_word), seed=0)
        with self._pipe_lock:
            self.composer.set_concepts({info.path: info.weight})
            set_loras(self.pipe, {})
            (image,) = generate(self.pipe, settings, model=self.base.spec, concepts={info.name: info.weight},
                                scope=self.composer.scope)
        return save_png(preview_path(info.path), image)

    def concept(self, name: str) -> ConceptInfo:
        path = child_path(self.concepts_dir, name, ".safetensors", what="concept name")
        if not path.is_file():
            raise SpectralDiffusionError(f"no concept {name!r} in {self.concepts_dir} (refresh the concept list)")
        return read_concept_info(path)

    # ---- generation ----------------------------------------------------------------------------------------

    def generate(self, settings: GenerationSettings, concepts: Mapping[str, float],
                 on_step: Callable[[int, int], None] | None = None) -> list[tuple[Path, Image.Image]]:
        """Compose `concepts` (name -> weight) and those the prompt names (`<concept:NAME:W>`) live, fuse the LoRAs
        it names (`<lora:NAME:W>`, files in `<output-dir>/loras`), sample, and save the PNGs (with metadata) to the
        output folder."""
        weights = {name: check_weight(weight, name) for name, weight in concepts.items()}
        tags = prompt_tags(settings.prompt, lora_dir=self.output_dir / "loras", concepts_dir=self.concepts_dir)
        paths = merge_weights("concept", {self.concept(name).path: weight for name, weight in weights.items()},
                              tags.concepts)
        with self._pipe_lock, report_steps(self.pipe, on_step):
            self.composer.set_concepts(paths)
            set_loras(self.pipe, tags.loras)
            images = generate(self.pipe, replace(settings, prompt=tags.prompt), model=self.base.spec,
                              concepts={path.stem: weight for path, weight in paths.items()},
                              scope=self.composer.scope, loras={path.name: w for path, w in tags.loras.items()})
        return list(zip(save_images(images, self.output_dir / "images"), images, strict=True))

    # ---- training ------------------------------------------------------------------------------------------

    def start_training(self, photos: Sequence[str | Path], *, name: str, token: str, class_word: str,
                       steps: int | None = None, rank: int | None = None, sample_every: int = 0) -> TrainingJob:
        """Check the request, then train `name` in a background thread; one job at a time per app.

        Settings not given come from the base model's recipe (`train_defaults`). `sample_every` N > 0 samples the
        concept's caption every N steps into `<name>_samples/` beside it (`TrainingJob.samples`)."""
        images = check_images(photos)
        out = child_path(self.concepts_dir, name, ".safetensors", what="concept name")
        if out.exists():
            raise SpectralDiffusionError(f"a concept named {name!r} already exists; choose another name")
        taken = next((c.name for c in self.concepts() if c.token == canonical_token(token.strip())), None)
        if taken is not None:
            raise SpectralDiffusionError(f"token {token.strip()!r} is already used by concept {taken!r}")
        sampling = {}
        if sample_every:
            sampling = {"validate_every": int(sample_every),
                        "validation_prompts": (fill_caption(CONCEPT_TEMPLATE, token.strip(), class_word.strip()),)}
        with self._job_lock:
            if self.job is not None and self.job.running:
                raise SpectralDiffusionError(f"{self.job.name} is still training; wait for it to finish")
            folder = Path(tempfile.mkdtemp(prefix="spectral-diffusion-photos-"))
            for i, image in enumerate(images):
                shutil.copyfile(image, folder / f"{i:03d}{image.suffix.lower()}")
            config = TrainConfig(photo_dir=folder, token=token.strip(), out=out, class_word=class_word.strip(),
                                 base=self.base, concepts_dir=self.concepts_dir,
                                 **{**self.train_defaults,
                                    **{k: int(v) for k, v in {"steps": steps, "rank": rank}.items() if v is not None},
                                    **sampling})
            try:
                config.check()
            except SpectralDiffusionError:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            job = TrainingJob(name=name, steps=config.steps,
                              samples_dir=out.with_name(f"{out.stem}_samples") if config.validate_every else None)
            job.thread = threading.Thread(target=self._train, args=(job, config, folder), daemon=True,
                                          name=f"train-{name}")
            self.job = job
            job.thread.start()
        return job

    @staticmethod
    def _train(job: TrainingJob, config: TrainConfig, folder: Path) -> None:
        def on_step(info: StepInfo) -> None:
            job.step, job.loss = info.step, info.loss
            job.losses.append((info.step, info.loss))

        try:
            job.result = train(config, on_step=on_step)
        except SpectralDiffusionError as exc:
            job.error = str(exc)
        except Exception:
            log.exception("training %s failed", job.name)
            job.error = INTERNAL_ERROR
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # ---- fusion and export -----------------------------------------------------------------------------------

    def fuse(self, concepts: Mapping[str, float], method: str, fmt: str, out_name: str, *,
             density: float = 0.5) -> tuple[FusionReport, list[Path]]:
        """Fuse `concepts` (name -> weight) into a fresh copy of the base model, saved as `<output>/models/<name>`.

        A fresh copy, because fusion rewrites weights in place and the app's pipeline carries live adapters.
        """
        if not concepts:
            raise SpectralDiffusionError("choose at least one concept to fuse")
        paths = [self.concept(name).path for name in concepts]
        folder = self.output_dir / "models"
        folder.mkdir(exist_ok=True)
        out = _unused(child_path(folder, out_name, what="output name"))
        base = self.base.load()
        report = fuse(paths, base.pipe, method, list(concepts.values()), density=density,
                      fingerprint=base.fingerprint)
        return report, save_fused(base.pipe, report, out, fmt)

    def export(self, name: str, fmt: str, out_name: str = "") -> Exported:
        """Write concept `name` as a LoRA (+ its token embedding) to `<output>/loras/<out_name>.safetensors`."""
        concept = self.concept(name)
        folder = self.output_dir / "loras"
        folder.mkdir(exist_ok=True)
        out = _unused(child_path(folder, out_name.strip() or f"{name}_{fmt}", ".safetensors", what="output name"))
        _unused(textual_inversion_path(out, concept.token))
        return export_lora(concept.path, out, fmt)


def recipe_for(spec: str) -> dict[str, object]:
    """The training settings the app uses on base `spec`: TrainConfig's defaults, with those the base's folder
    recommends (`recommended_settings`) in their place; what names the run (photos, token, output, base) is the
    app's."""
    defaults = {f.name: f.default for f in fields(TrainConfig)
                if f.name not in PER_RUN_FIELDS and f.default is not MISSING}
    return {**defaults, **recommended_settings(spec)}


def _unused(path: Path) -> Path:
    """`path`, if nothing is there yet: the app never overwrites (the CLI's --overwrite is not offered here)."""
    if path.exists():
        raise SpectralDiffusionError(f"{path.name} already exists in {path.parent}; choose another output name")
    return path
