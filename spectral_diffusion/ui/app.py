"""The Gradio Blocks of the web app: Generate (concepts, settings, regions), Train, Fuse & export.

Every handler calls the library through `Backend`; none reimplements generation, training or fusion. Handlers
translate errors: a `SpectralDiffusionError` reaches the user as its one-line message, anything else is logged
on the server and shown as a generic message (no stack traces in the browser). Event handlers that clients may
call have an `api_name` (see docs/app.md); the glue between widgets is private.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
import math
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image, ImageDraw, ImageOps

from spectral_diffusion.errors import SpectralDiffusionError, check_number
from spectral_diffusion.export import FORMATS as LORA_FORMATS
from spectral_diffusion.fusion import METHODS as FUSION_METHODS
from spectral_diffusion.fusion import OUTPUT_FORMATS as FUSION_FORMATS
from spectral_diffusion.fusion import RECOMMENDED_METHOD
from spectral_diffusion.generation import (
    MAX_PIXELS,
    SCHEDULERS,
    GenerationSettings,
    native_size,
    resolve_seed,
    size_multiple,
)
from spectral_diffusion.ui import regions as region_table
from spectral_diffusion.ui.backend import INTERNAL_ERROR, Backend, TrainingJob
from spectral_diffusion.ui.concepts import ConceptInfo
from spectral_diffusion.ui.uploads import MAX_UPLOAD_MB, thumbnails

log = logging.getLogger(__name__)

QUEUE_SIZE = 16  # waiting events beyond this are refused with "queue full" instead of piling up
# Gradio spots a progress parameter by its default being a `gr.Progress` and passes a fresh tracker per call.
PROGRESS = gr.Progress()
# System fonts only: nothing is fetched from a font CDN, so the page renders at once offline.
THEME = gr.themes.Default(
    primary_hue="orange",
    font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
)
CSS = """
#generate-button { min-height: 5.5em; }
.concept-row { align-items: end; }
#concept-library .caption-label { white-space: normal; overflow-wrap: anywhere; max-width: 100%; }
#photo-thumbnails .grid-container, #train-samples .grid-container {
  grid-template-columns: repeat(auto-fill, minmax(96px, 128px)) !important; }
"""


# ---- errors ----------------------------------------------------------------------------------------------------


@contextmanager
def _user_errors(what: str) -> Iterator[None]:
    """Our errors as their message (HTML-escaped: tokens look like tags), anything else logged and generic."""
    try:
        yield
    except gr.Error:
        raise
    except SpectralDiffusionError as exc:
        raise gr.Error(html.escape(str(exc), quote=False), print_exception=False) from None
    except Exception:
        log.exception("%s failed", what)
        raise gr.Error(INTERNAL_ERROR, print_exception=False) from None


def handler(fn: Callable) -> Callable:
    """Wrap an event handler (plain or generator) in `_user_errors`, keeping the signature Gradio inspects."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
            with _user_errors(fn.__name__):
                yield from fn(*args, **kwargs)

        return stream

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with _user_errors(fn.__name__):
            return fn(*args, **kwargs)

    return call


# ---- small pure helpers ----------------------------------------------------------------------------------------


def _whole(value: object, what: str) -> int:
    """A whole number sent by the page or an API client; NaN, infinities and fractions are refused in one line."""
    number = check_number(value, what)
    if number != int(number):
        raise SpectralDiffusionError(f"{what} must be a whole number, got {number:g}")
    return int(number)


def caption(settings: GenerationSettings, image: Image.Image) -> str:
    """The gallery caption of one result (an image `generate` returned): what differs between runs, short."""
    width, height = image.size
    return (f"seed {image.info['seed']} · {settings.steps} steps · CFG {settings.guidance:g} · "
            f"{SCHEDULERS[settings.scheduler][2]} · {width}x{height}")


def concept_card(info: ConceptInfo, fingerprint: str) -> tuple[Image.Image, str]:
    """A gallery card: the concept's preview (or a tile with its full name) and a caption with the full name, trigger
    and band."""
    if info.preview is not None:
        with Image.open(info.preview) as preview:
            image = ImageOps.contain(preview.convert("RGB"), (256, 256))
    else:
        image = Image.new("RGB", (256, 256), (72, 76, 86))
        lines = textwrap.wrap(info.name, 36, break_on_hyphens=False) or [info.name]  # the full name, never cut
        ImageDraw.Draw(image).multiline_text((12, 128 - 7 * len(lines)), "\n".join(lines), fill=(240, 240, 240))
    return image, f"{info.name}: {info.summary(fingerprint)}"


def concept_details(info: ConceptInfo, fingerprint: str) -> str:
    """Markdown describing one concept, including whether it fits the loaded base model."""
    same_base = info.base_fingerprint == fingerprint
    base = f"`{info.base_fingerprint}`" + (f" ({info.base_model})" if info.base_model else "")
    band = f", band {info.band}" if info.band is not None else ""
    return "\n".join([
        f"**{html.escape(info.name)}**",
        f"- trigger {', '.join(f'`{t}`' for t in info.triggers)}"
        + (f", class word *{html.escape(info.class_word)}*" if info.class_word else ""),
        f"- {info.variant} rank {info.rank}{band}; recommended weight {info.weight:g}",
        f"- base {base}: " + ("matches the loaded model" if same_base else "**another base model**: it will not load"),
    ])


def recipe_line(recipe: dict[str, Any]) -> str:
    """The training settings the Train tab uses on the loaded base, in one line."""
    def fmt(value: object) -> str:
        return "default" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    return (f"{recipe['variant']} adapter on `{recipe['targets']}`, batch {recipe['batch_size']}, learning rates "
            f"UNet {fmt(recipe['lr_unet'])} / text {fmt(recipe['lr_text'])} / token {fmt(recipe['lr_emb'])}"
            + ("" if recipe["flip"] else ", no flips"))


def _load(path: Path) -> Image.Image:
    """An image file's pixels (the gallery then serves a copy: the concepts folder itself is never served)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def _append_text(text: str | None, addition: str) -> str:
    """`text` with `addition` appended after one space (A1111 inserts LoRA tags the same way)."""
    text = (text or "").rstrip()
    return f"{text} {addition}" if text else addition


# ---- the UI ----------------------------------------------------------------------------------------------------


def build_app(backend: Backend) -> gr.Blocks:
    """The whole UI, wired to `backend`. Queue and launch it with `launch()`."""
    with gr.Blocks(title="spectral-diffusion", analytics_enabled=False) as demo:
        ui = _AppBuilder(backend, demo)
        gr.Markdown(f"## spectral-diffusion\nBase model `{backend.base.spec}` · concepts in "
                    f"`{backend.concepts_dir}` · outputs in `{backend.output_dir}`")
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                ui.generate_tab()
            with gr.Tab("Train", id="train"):
                ui.train_tab()
            with gr.Tab("Fuse & export", id="fuse"):
                ui.fuse_tab()
                ui.export_tab()
        ui.wire_refresh()
        ui.concepts_api()
    return demo


class _AppBuilder:
    """Builds the tabs inside a Blocks context; holds the components that several tabs update."""

    def __init__(self, backend: Backend, demo: gr.Blocks) -> None:
        self.backend = backend
        self.demo = demo
        self.pickers: list[gr.Dropdown] = []  # every concept dropdown, refreshed together
        self.library: gr.Gallery | None = None
        self.refresh: gr.Button | None = None
        self.training_followers: list = []  # events after which a new concept may exist

    # ---- concept pickers ---------------------------------------------------------------------------------------

    def concept_weights(self, label: str, prompt: gr.Textbox | None = None) -> tuple[gr.Dropdown, gr.JSON]:
        """A concept multi-select with a weight slider per chosen concept (and trigger buttons for `prompt`).

        The weights live in a hidden JSON value `{name: weight}`, so API clients pass them as one dict.
        """
        backend = self.backend
        pick = gr.Dropdown(choices=[c.name for c in backend.concepts()], value=[], multiselect=True, label=label,
                           info="concept files in the concepts folder")
        weights = gr.JSON(value={}, visible=False)
        self.pickers.append(pick)

        def sync(names: list[str], current: dict | None) -> dict:
            known = {c.name: c for c in backend.concepts()}
            current = current or {}
            return {n: float(current.get(n, known[n].weight)) for n in names or [] if n in known}

        pick.change(sync, [pick, weights], weights, api_visibility="private", queue=False)

        @gr.render(inputs=[pick, weights], triggers=[pick.change])
        def rows(names: list[str], current: dict | None) -> None:
            known = {c.name: c for c in backend.concepts()}
            current = current or {}
            for name in names or []:
                if name not in known:
                    continue
                info = known[name]
                with gr.Row(elem_classes="concept-row"):
                    slider = gr.Slider(0.0, 2.0, value=float(current.get(name, info.weight)), step=0.05,
                                       label=f"{name} weight", key=(label, "weight", name), scale=3,
                                       elem_classes="concept-weight")

                    def set_weight(value: float, state: dict | None, name: str = name) -> dict:
                        return {**(state or {}), name: float(value)}

                    slider.change(set_weight, [slider, weights], weights, api_visibility="private", queue=False)
                    if prompt is not None:
                        for trigger in info.triggers:
                            button = gr.Button(f"Insert {trigger}", size="sm", scale=1, min_width=100,
                                               key=(label, "insert", name, trigger))

                            def insert(text: str | None, trigger: str = trigger) -> str:
                                return _append_text(text, trigger)

                            button.click(insert, prompt, prompt, api_visibility="private", queue=False)

        return pick, weights

    def concept_library(self, pick: gr.Dropdown) -> None:
        """Cards of every concept (preview + trigger); clicking one adds it to `pick` and shows its details."""
        backend = self.backend
        cards = gr.Gallery(value=self.cards(), label="Concept library (click a card to use it)", columns=4,
                           height=360, allow_preview=False, object_fit="contain", format="png", buttons=[],
                           elem_id="concept-library")
        with gr.Row():
            details = gr.Markdown(elem_id="concept-details")
            self.refresh = gr.Button("Refresh", size="sm", scale=0, min_width=120, elem_id="refresh-concepts")
        self.library = cards

        @handler
        def choose(chosen: list[str] | None, evt: gr.SelectData) -> tuple[Any, str]:
            name = str(evt.value["caption"]).split(":", 1)[0]
            info = backend.concept(name)
            names = list(chosen or [])
            if name not in names:
                names.append(name)
            return gr.update(value=names), concept_details(info, backend.fingerprint)

        cards.select(choose, pick, [pick, details], api_visibility="private")

    def cards(self) -> list[tuple[Image.Image, str]]:
        return [concept_card(c, self.backend.fingerprint) for c in self.backend.concepts_with_previews()]

    # ---- Generate --------------------------------------------------------------------------------------------

    def generate_tab(self) -> None:
        backend = self.backend
        width, height = native_size(backend.pipe)
        step = size_multiple(backend.pipe)
        largest = math.isqrt(MAX_PIXELS) // step * step  # a square of the largest sides stays within MAX_PIXELS
        with gr.Row():
            with gr.Column(scale=5):
                prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt",
                                    placeholder="a photo of <dogA> dog and <catB> cat on the beach")
                negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="negative-prompt")
            with gr.Column(scale=1, min_width=180):
                run = gr.Button("Generate", variant="primary", size="lg", elem_id="generate-button")
        with gr.Row():
            with gr.Column(scale=5):
                pick, weights = self.concept_weights("Concepts", prompt)
                with gr.Tabs():
                    with gr.Tab("Settings"):
                        with gr.Row():
                            scheduler = gr.Dropdown([(v[2], k) for k, v in SCHEDULERS.items()], value="dpm++",
                                                    label="Sampler")
                            steps = gr.Slider(1, 150, value=20, step=1, label="Steps")
                        with gr.Row():
                            width_in = gr.Slider(step, min(4 * width, largest), value=width, step=step,
                                                 label="Width")
                            height_in = gr.Slider(step, min(4 * height, largest), value=height, step=step,
                                                  label="Height")
                        with gr.Row():
                            guidance = gr.Slider(0.0, 20.0, value=7.0, step=0.5, label="Guidance scale (CFG)")
                            count = gr.Slider(1, 8, value=1, step=1, label="Number of images")
                        with gr.Row():
                            seed = gr.Number(-1, precision=0, label="Seed (-1: random)", scale=3)
                            with gr.Column(scale=1, min_width=140):
                                dice = gr.Button("Random seed", size="sm")
                                reuse = gr.Button("Reuse last seed", size="sm")
                    with gr.Tab("Concept library"):
                        self.concept_library(pick)
                    with gr.Tab("Regions"):
                        rows, feather, region_mode = self.regions_panel(pick, width_in, height_in)
            with gr.Column(scale=6):
                gallery = gr.Gallery(label="Results", columns=2, height=520, object_fit="contain", format="png",
                                     elem_id="results")
                used_seed = gr.Number(None, label="Seed used", precision=0, interactive=False,
                                      placeholder="shown after a run", elem_id="used-seed")
                info = gr.Textbox(label="Generation parameters", lines=4, interactive=False,
                                  elem_id="parameters")

        @handler
        def generate(prompt: str, negative_prompt: str, concepts: dict | None, seed: float | None, steps: float,
                     guidance_scale: float, width: float, height: float, scheduler: str, num_images: float,
                     regions: list[list] | None, region_feather: float, region_mode: str = "auto",
                     progress: gr.Progress = PROGRESS) -> tuple[list, int, str]:
            """Generate images; `concepts` maps concept names to weights, `regions` rows are
            [prompt, x0, y0, x1, y1, negative prompt] with relative boxes, `region_mode` auto, attention or latent."""
            if concepts is not None and not isinstance(concepts, dict):
                raise SpectralDiffusionError("concepts must map concept names to weights, e.g. {\"dogA\": 1.0}")
            settings = GenerationSettings(
                prompt=prompt or "", negative=negative_prompt or "", steps=_whole(steps, "steps"),
                guidance=guidance_scale, scheduler=scheduler,
                seed=resolve_seed(None if seed is None else _whole(seed, "seed")),
                size=(_whole(width, "width"), _whole(height, "height")), n=_whole(num_images, "number of images"),
                regions=tuple(region_table.rows_to_regions(regions, region_feather)),
                region_mode=region_mode or "auto")
            progress(0, desc="Preparing")
            results = backend.generate(settings, concepts or {},
                                       on_step=lambda i, n: progress((i, n), desc="Denoising", unit="steps"))
            return ([(str(path), caption(settings, image)) for path, image in results], settings.seed,
                    "\n\n".join(image.info["parameters"] for _, image in results))

        run.click(generate, [prompt, negative, weights, seed, steps, guidance, width_in, height_in, scheduler,
                             count, rows, feather, region_mode], [gallery, used_seed, info], api_name="generate")
        dice.click(lambda: -1, None, seed, api_visibility="private", queue=False)
        reuse.click(lambda used: used, used_seed, seed, api_visibility="private", queue=False)

    def regions_panel(self, pick: gr.Dropdown, width: gr.Slider,
                      height: gr.Slider) -> tuple[gr.Dataframe, gr.Slider, gr.Radio]:
        """Region rows (prompt + relative box + optional negative prompt), layout presets, the region mode, and a
        live preview."""
        backend = self.backend
        gr.Markdown("One row per subject: its prompt and box, relative to the image (0..1). The main prompt fills "
                    "the rest. Leave the table empty for ordinary generation.")
        rows = gr.Dataframe(value=[], headers=region_table.HEADERS, datatype=region_table.DATATYPES,
                            column_count=len(region_table.HEADERS), row_count=2, type="array", interactive=True,
                            label="Regions", elem_id="regions")
        with gr.Row():
            layout_buttons = [gr.Button(name, size="sm") for name in region_table.LAYOUTS]
            clear = gr.Button("Clear", size="sm")
        feather = gr.Slider(0.0, 0.25, value=0.05, step=0.01, label="Soft edge (fraction of the image side)")
        mode = gr.Radio([("Auto", "auto"), ("Cross-attention", "attention"), ("Latent windows", "latent")],
                        value="auto", label="Region mode", elem_id="region-mode",
                        info="Cross-attention: each region's prompt in attention over the whole image. Latent "
                             "windows: each region denoised on its own crop, for models that draw one subject "
                             "per image. Auto: latent windows when every region is at least the model's native "
                             "size, else cross-attention.")
        preview = gr.Image(region_table.preview([], int(width.value), int(height.value)), label="Layout",
                           interactive=False, height=240, format="png")

        for button in layout_buttons:

            def use_layout(chosen: list[str] | None, width_now: float, height_now: float,
                           layout: str = button.value) -> tuple[list[list], int, int]:
                """The preset boxes, prompted with the chosen concepts' trigger and class word, in order, and the
                canvas grown to fit them (`regions.layout_canvas`)."""
                known = {c.name: c for c in backend.concepts()}
                prompts = [" ".join(filter(None, [known[n].triggers[0], known[n].class_word]))
                           for n in chosen or [] if n in known]
                canvas = region_table.layout_canvas(layout, (int(width_now), int(height_now)),
                                                    native_size(backend.pipe), size_multiple(backend.pipe),
                                                    (int(width.maximum), int(height.maximum)))
                return region_table.layout_rows(layout, prompts), *canvas

            button.click(use_layout, [pick, width, height], [rows, width, height], api_visibility="private",
                         queue=False)
        clear.click(lambda: [], None, rows, api_visibility="private", queue=False)
        gr.on([rows.change, width.change, height.change], lambda r, w, h: region_table.preview(r, int(w), int(h)),
              [rows, width, height], preview, api_visibility="private", queue=False)
        return rows, feather, mode

    # ---- Train -----------------------------------------------------------------------------------------------

    def train_tab(self) -> None:
        backend = self.backend
        gr.Markdown(f"Upload 3-20 photos of one subject (images up to {MAX_UPLOAD_MB} MB each). Training runs in "
                    "the background; the concept appears in the concept lists when it is done.")
        with gr.Row():
            with gr.Column():
                photos = gr.File(label="Photos", file_count="multiple", file_types=["image"], elem_id="photos",
                                 height=140)
                thumbs = gr.Gallery(label="Uploaded photos", columns=6, height=220, allow_preview=False,
                                    object_fit="contain", format="png", buttons=[], elem_id="photo-thumbnails")
            with gr.Column():
                name = gr.Textbox(label="Concept name", placeholder="dogA", info="the file name in the concepts folder")
                token = gr.Textbox(label="Trigger token", placeholder="<dogA>", info="a new word to use in prompts")
                class_word = gr.Textbox(label="Class word", placeholder="dog", info="what the subject is")
                recipe = backend.train_defaults
                steps = gr.Slider(1, 5000, value=int(recipe["steps"]), step=1, label="Training steps",
                                  elem_id="train-steps")
                with gr.Accordion("Advanced", open=False):
                    rank = gr.Slider(1, 32, value=int(recipe["rank"]), step=1, elem_id="train-rank",
                                     label="Rank (singular vectors per band)")
                    sample_every = gr.Slider(0, 1000, value=max(1, int(recipe["steps"]) // 4), step=1,
                                             label="Sample every N steps (0: never)", elem_id="train-sample-every")
                    gr.Markdown(f"Recipe for this base: {recipe_line(recipe)}", elem_id="train-recipe")
                start = gr.Button("Train", variant="primary", elem_id="train-button")
                status = gr.Textbox(label="Training status", interactive=False, elem_id="train-status")
        loss_plot = gr.LinePlot(x="step", y="loss", title="Training loss", height=260, x_title="step",
                                y_title="loss", elem_id="train-loss")
        samples = gr.Gallery(label="Samples during training", columns=6, height=220, object_fit="contain",
                             format="png", buttons=[], elem_id="train-samples")
        shown = gr.State([-1, -1])  # loss rows and samples this page shows, so an idle poll sends nothing
        poll = gr.Timer(1.0)

        @handler
        def train(photos: list[str] | None, concept_name: str, token: str, class_word: str, steps: float,
                  rank: float, sample_every: float = 0) -> str:
            """Start training a concept from the uploaded photos in the background; `sample_every` N > 0 samples
            the concept every N steps."""
            job = backend.start_training(photos or [], name=concept_name or "", token=token or "",
                                         class_word=class_word or "", steps=_whole(steps, "steps"),
                                         rank=_whole(rank, "rank"), sample_every=_whole(sample_every or 0, "sample every"))
            return job.describe()

        def follow(job: TrainingJob, progress: gr.Progress) -> Iterator[str]:
            while job.running:
                progress((job.step, job.steps), desc=f"Training {job.name}", unit="steps")
                yield job.describe()
                time.sleep(0.5)
            yield job.describe()

        @handler
        def train_status(progress: gr.Progress = PROGRESS) -> Iterator[str]:
            """Follow the training job until it ends; a failure comes back as an error with the trainer's message."""
            job = backend.job
            if job is None:
                raise SpectralDiffusionError("no training has been started")
            yield from follow(job, progress)
            if job.error is not None:
                raise SpectralDiffusionError(job.describe())

        def resume(progress: gr.Progress = PROGRESS) -> Iterator[str]:
            """On page load: show the last job, following it if it still runs."""
            if backend.job is not None:
                yield from follow(backend.job, progress)

        def follow_plots(seen: list[int]) -> tuple[Any, Any, list[int]]:
            """The running job's loss curve and samples, each sent only when it has grown."""
            job = backend.job
            if job is None:
                return gr.skip(), gr.skip(), seen
            drawn = job.samples()
            rows = len(job.losses)
            return (job.loss_curve() if rows != seen[0] else gr.skip(),
                    [(_load(path), f"step {step}") for path, step in drawn] if len(drawn) != seen[1] else gr.skip(),
                    [rows, len(drawn)])

        poll.tick(follow_plots, shown, [loss_plot, samples, shown], api_visibility="private", queue=False,
                  show_progress="hidden")
        photos.change(thumbnails, photos, thumbs, api_visibility="private")
        started = start.click(train, [photos, name, token, class_word, steps, rank, sample_every], status,
                              api_name="train")
        self.training_followers.append(
            started.success(train_status, None, status, api_name="train_status", concurrency_limit=None))
        self.training_followers.append(
            self.demo.load(resume, None, status, api_visibility="private", concurrency_limit=None))

    # ---- Fuse & export --------------------------------------------------------------------------------------

    def fuse_tab(self) -> None:
        backend = self.backend
        gr.Markdown("### Fuse concepts into a model\nWrites a new model with the chosen concepts merged into the "
                    "base weights (the base model itself is not changed). `closed-form` keeps each concept's own "
                    "token mapped as its own model did and ordinary prompts as the base did (the best measured); "
                    "`spectral` is the exact sum for concepts in disjoint bands; the others are the usual baselines.")
        with gr.Row():
            with gr.Column():
                pick, weights = self.concept_weights("Concepts to fuse")
            with gr.Column():
                method = gr.Dropdown(list(FUSION_METHODS), value=RECOMMENDED_METHOD, label="Method")
                fmt = gr.Radio(list(FUSION_FORMATS), value="diffusers", label="Output format",
                               info="diffusers folder, one SD 1.x .safetensors file, or one merged LoRA")
                density = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="Density (ties, dare)")
                out_name = gr.Textbox(label="Output name", placeholder="fused-model",
                                      info=f"written to {backend.output_dir / 'models'}")
                run = gr.Button("Fuse", variant="primary")
                status = gr.Textbox(label="Fusion status", interactive=False, lines=3)

        @handler
        def fuse(concepts: dict | None, method: str, output_format: str, output_name: str, density: float,
                 progress: gr.Progress = PROGRESS) -> str:
            """Fuse concepts (name -> weight) with `method` and save the model under the output name."""
            progress(0.1, desc="Loading the base model and fusing")
            report, written = backend.fuse(concepts or {}, method, output_format, output_name or "",
                                           density=float(density))
            return f"{report.summary()}\nWrote {written[0].parent}"

        run.click(fuse, [weights, method, fmt, out_name, density], status, api_name="fuse")

    # ---- Export ----------------------------------------------------------------------------------------------

    def export_tab(self) -> None:
        backend = self.backend
        gr.Markdown("### Export a concept as a LoRA\nA plain LoRA (exact: the same weight change) plus its token "
                    "embedding, for diffusers, ComfyUI or A1111.")
        with gr.Row():
            with gr.Column():
                concept = gr.Dropdown(choices=[c.name for c in backend.concepts()], value=None, label="Concept")
                self.pickers.append(concept)
                fmt = gr.Radio(list(LORA_FORMATS), value=LORA_FORMATS[0], label="Format",
                               info="peft: diffusers keys; kohya: A1111 / ComfyUI keys")
                out_name = gr.Textbox(label="Output name", placeholder="dogA_lora",
                                      info=f"written to {backend.output_dir / 'loras'}")
                run = gr.Button("Export LoRA", variant="primary")
            with gr.Column():
                files = gr.File(label="Exported files", file_count="multiple", interactive=False)
                status = gr.Textbox(label="Export status", interactive=False)

        @handler
        def export_lora(concept: str | None, lora_format: str, output_name: str) -> tuple[list[str], str]:
            """Export a concept as a LoRA file plus a textual-inversion embedding file."""
            if not concept:
                raise SpectralDiffusionError("choose a concept to export")
            done = backend.export(concept, lora_format, output_name or "")
            return ([str(done.lora), str(done.embedding)],
                    f"Wrote {done.lora.name} and {done.embedding.name}; use {done.token} in prompts.")

        run.click(export_lora, [concept, fmt, out_name], [files, status], api_name="export_lora")

    # ---- refreshing the concept lists ------------------------------------------------------------------------

    def refresh_lists(self, *chosen: Any) -> list[Any]:
        """New choices for every concept picker (keeping what is still there) and new library cards."""
        names = [c.name for c in self.backend.concepts()]
        updates = []
        for value in chosen:
            if isinstance(value, list):
                updates.append(gr.update(choices=names, value=[v for v in value if v in names]))
            else:
                updates.append(gr.update(choices=names, value=value if value in names else None))
        return [*updates, self.cards()]

    def wire_refresh(self) -> None:
        """Concept lists refresh on page load, on the refresh button, and when a training job ends."""
        outputs = [*self.pickers, self.library]
        gr.on([self.refresh.click, self.demo.load], self.refresh_lists, self.pickers, outputs,
              api_visibility="private", queue=False)
        for followed in self.training_followers:
            followed.then(self.refresh_lists, self.pickers, outputs, api_visibility="private", queue=False)

    def concepts_api(self) -> None:
        """`/concepts` for API clients: the listing the pickers show, as plain data."""
        backend = self.backend

        def concepts() -> list[dict]:
            """Every concept in the concepts folder, with its triggers, band and whether it fits the loaded base."""
            return [{"name": c.name, "triggers": list(c.triggers), "class_word": c.class_word, "variant": c.variant,
                     "rank": c.rank, "band": c.band, "recommended_weight": c.weight,
                     "base_fingerprint": c.base_fingerprint, "fits_base": c.base_fingerprint == backend.fingerprint}
                    for c in backend.concepts()]

        gr.api(concepts, api_name="concepts", queue=False)


def launch(backend: Backend, *, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           prevent_thread_lock: bool = False, quiet: bool = False) -> gr.Blocks:
    """Build, queue and serve the app; returns the running Blocks (`.local_url`, `.share_url`, `.close()`).

    One event of each kind runs at a time (`default_concurrency_limit=1`; the backend's lock also serialises the
    pipeline), at most `QUEUE_SIZE` wait. Only `backend.output_dir` is served besides Gradio's own cache, uploads
    are capped at `MAX_UPLOAD_MB`, and nothing is sent anywhere: no analytics, no share tunnel unless `share`,
    no run history, no monitoring page.
    """
    demo = build_app(backend)
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    demo.launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=prevent_thread_lock, quiet=quiet,
        show_error=False, max_file_size=f"{MAX_UPLOAD_MB}mb", allowed_paths=[str(backend.output_dir)],
        theme=THEME, css=CSS, footer_links=["api"], run_history=False, enable_monitoring=False, mcp_server=False,
        ssr_mode=False, pwa=False,
    )
    return demo
