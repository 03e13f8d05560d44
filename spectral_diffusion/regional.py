"""Regional prompts: a global prompt plus boxed or masked regions, each with its own prompt.

Two modes. `attention` blends cross-attention outputs per region, described below. `latent` (the region mode of
MultiDiffusion and A1111 Regional Prompter's "Latent" mode) denoises each region on its own crop window of the latent
with its own prompt and blends the noise predictions by the region masks: a model that only learned one subject per
native-size image still draws one per window (`LatentWindowForward`). `auto`, `GenerationSettings`' default, picks
`latent` when every region spans at least the model's native size on the canvas, `attention` otherwise
(`resolve_region_mode`); `fitting_canvas` is the smallest canvas on which the regions do.

Attention mode:

Mix-of-Show's regionally controllable sampling keeps two subjects apart by letting each image area attend to its
own prompt. Here every cross-attention (`attn2`) layer of the UNet computes its output once for the global prompt
and once per region, and blends them with the region masks resized to the layer's resolution: soft masks (feathered
box edges or a greyscale mask image), any number of regions, overlaps normalised, the global output everywhere
outside the regions. The unconditional half of classifier-free guidance uses the global negative prompt for the
global output and each region's own negative prompt (default: the global one) for its region.

The processor calls `attn.to_q/to_k/to_v/to_out`, so adapters wrapped inside those Linear modules (live composition)
apply to every region; the original processors are restored when the `regional_prompting` block exits.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from PIL import Image

from spectral_diffusion.errors import SpectralDiffusionError, check_number

Box = tuple[float, float, float, float]
Window = tuple[slice, slice]
# scope(prompt): a context manager inside which only the live concepts that `prompt` names apply (Composer.scope)
ConceptScope = Callable[[str], AbstractContextManager]

# How regions are drawn: blended cross-attention outputs, or per-region denoising of latent windows.
REGION_MODES = ("attention", "latent")
# What a caller may ask for: one of those, or `auto` (`resolve_region_mode` picks one for the regions and canvas).
REGION_MODE_CHOICES = ("auto", *REGION_MODES)
# A mask image is decoded whole and resized to the canvas; a larger one (a decompression bomb) is refused from its header.
MAX_MASK_PIXELS = 8192 * 8192


def check_region_mode(mode: str, choices: Sequence[str] = REGION_MODE_CHOICES) -> str:
    """`mode` if it is one of `choices`, else a `SpectralDiffusionError` naming them."""
    if mode not in choices:
        raise SpectralDiffusionError(f"unknown region mode {mode!r}; choose one of {', '.join(choices)}")
    return mode


@dataclass(frozen=True)
class Region:
    """One region: its prompt, where it is (relative box x0,y0,x1,y1 or a greyscale mask image), how soft its edge is."""

    prompt: str
    box: Box | None = (0.0, 0.0, 1.0, 1.0)
    mask_path: Path | None = None
    negative: str | None = None
    feather: float = 0.0

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise SpectralDiffusionError("a region needs a non-empty prompt")
        if (self.box is None) == (self.mask_path is None):
            raise SpectralDiffusionError(f"region {self.prompt!r} needs exactly one of a box or a mask image")
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
                raise SpectralDiffusionError(
                    f"region {self.prompt!r}: box {x0:g},{y0:g},{x1:g},{y1:g} must satisfy 0 <= x0 < x1 <= 1 and "
                    "0 <= y0 < y1 <= 1 (relative to the image width and height)")
        check_number(self.feather, f"region {self.prompt!r}: feather", low=0)
        if self.mask_path is not None:
            _check_mask(self.prompt, self.mask_path)

    def describe(self) -> str:
        """`prompt:where` in the syntax `parse_region` reads (for PNG metadata)."""
        where = str(self.mask_path) if self.box is None else ",".join(f"{v:g}" for v in self.box)
        return f"{self.prompt}:{where}"

    def bounds(self) -> Box:
        """The box, or for a mask image the bounding box of its non-zero pixels, relative to the image."""
        if self.box is not None:
            return self.box
        with Image.open(self.mask_path) as img:
            x0, y0, x1, y1 = img.convert("L").getbbox()
            return x0 / img.width, y0 / img.height, x1 / img.width, y1 / img.height


def _check_mask(prompt: str, path: Path) -> None:
    """Refuse a mask file that is not an image, is larger than `MAX_MASK_PIXELS` (read from its header) or is cut off."""
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_MASK_PIXELS:
                raise SpectralDiffusionError(f"region {prompt!r}: mask image {path} is {img.width}x{img.height}, "
                                             f"more than {MAX_MASK_PIXELS} pixels")
            empty = img.convert("L").getbbox() is None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise SpectralDiffusionError(
            f"region {prompt!r}: {path} is not a readable image ({type(exc).__name__})") from None
    if empty:
        raise SpectralDiffusionError(f"region {prompt!r}: mask image {path} is black everywhere, so the region "
                                     "covers nothing")


def parse_region(spec: str, *, negative: str | None = None, feather: float = 0.0) -> Region:
    """Parse `"PROMPT:x0,y0,x1,y1"` or `"PROMPT:mask.png"`; the place is whatever follows the LAST colon."""
    prompt, sep, where = spec.rpartition(":")
    if not sep or not prompt.strip() or not where.strip():
        raise SpectralDiffusionError(
            f"cannot parse region {spec!r}: expected 'PROMPT:x0,y0,x1,y1' (relative box) or 'PROMPT:MASK.png'")
    where = where.strip()
    parts = where.split(",")
    if len(parts) == 1 and not _is_number(where):
        path = Path(where).expanduser()
        if not path.is_file():
            raise SpectralDiffusionError(f"region {spec!r}: mask image {path} does not exist")
        return Region(prompt.strip(), box=None, mask_path=path, negative=negative, feather=feather)
    if len(parts) != 4 or not all(_is_number(p) for p in parts):
        raise SpectralDiffusionError(
            f"cannot parse region {spec!r}: the box after the last colon must be four numbers x0,y0,x1,y1 in [0, 1]")
    x0, y0, x1, y1 = (float(p) for p in parts)
    return Region(prompt.strip(), box=(x0, y0, x1, y1), negative=negative, feather=feather)


def parse_regions(specs: Sequence[str], *, negatives: Sequence[str | None] = (),
                  feather: float = 0.0) -> tuple[Region, ...]:
    """`parse_region` of each spec, the i-th with the i-th of `negatives` (none left: the global negative prompt);
    more negatives than regions are refused, since one would be dropped unseen."""
    if len(negatives) > len(specs):
        raise SpectralDiffusionError(f"{len(negatives)} --region-negative given for {len(specs)} --region")
    padded = [*negatives, *[None] * (len(specs) - len(negatives))]
    return tuple(parse_region(spec, negative=negative or None, feather=feather)
                 for spec, negative in zip(specs, padded, strict=True))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def region_mask(region: Region, height: int, width: int) -> torch.Tensor:
    """The region's soft mask at image resolution, `[height, width]` in [0, 1].

    A box edge is a linear ramp `feather` wide (relative to the image side) centred on the edge, so the mask's mass
    stays the box's area; with no feather a pixel belongs to the box when its centre does.
    """
    if region.mask_path is not None:
        with Image.open(region.mask_path) as img:
            grey = img.convert("L").resize((width, height), Image.Resampling.BILINEAR)
            return torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).float().view(height, width) / 255
    x0, y0, x1, y1 = region.box

    def ramp(lo: float, hi: float, n: int) -> torch.Tensor:
        centres = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        inside = torch.minimum(centres - lo, hi - centres)
        if region.feather == 0:
            return (inside > 0).double()
        return (inside / region.feather + 0.5).clamp(0, 1)

    return torch.outer(ramp(y0, y1, height), ramp(x0, x1, width)).float()


def _pixels_inside(lo: float, hi: float, n: int) -> int:
    """How many of `n` pixels have their centre strictly between `lo` and `hi` (relative): those `region_mask` puts
    in a box with no feather, counted without building the mask."""
    def centre(k: int) -> float:
        return (k + 0.5) / n

    return bisect.bisect_left(range(n), hi, key=centre) - bisect.bisect_right(range(n), lo, key=centre)


def _spans(regions: Sequence[Region], size: tuple[int, int], native: tuple[int, int]) -> bool:
    """Whether every region's `bounds` cover at least `native` (width, height) pixels of a canvas of `size`."""
    return all(_pixels_inside(x0, x1, size[0]) >= native[0] and _pixels_inside(y0, y1, size[1]) >= native[1]
               for x0, y0, x1, y1 in (region.bounds() for region in regions))


def resolve_region_mode(mode: str, regions: Sequence[Region], size: tuple[int, int],
                        native: tuple[int, int]) -> str:
    """`mode`, with `auto` resolved for `regions` on a canvas of `size` (width, height).

    `auto` is `latent` when every region (a mask region: the bounding box of its non-zero pixels) spans at least the
    model's `native` (width, height) in both directions, so that each latent window holds a whole image of the model
    (MultiDiffusion's windows; a one-subject model at 128x64 with two half boxes); `attention` otherwise (SD 1.5 at
    768x512 with two half-width regions), and with no regions.
    """
    check_region_mode(mode)
    if mode != "auto":
        return mode
    return "latent" if regions and _spans(regions, size, native) else "attention"


def fitting_canvas(regions: Sequence[Region], native: tuple[int, int], multiple: int) -> tuple[int, int]:
    """The smallest canvas (width, height), sides multiples of `multiple`, on which every region spans at least
    `native` in both directions (as `resolve_region_mode` measures); `native` itself with no regions."""
    if not regions:
        return native
    bounds = [region.bounds() for region in regions]

    def side(spans: list[tuple[float, float]], need: int) -> int:
        # A span s covers more than s * n - 1 and fewer than s * n + 1 of n pixels: with s the narrowest, no side
        # below `low` fits and `high` does. Past 1024 candidates (a span under 2 / (1024 * multiple)) `high` is taken.
        narrowest = min(hi - lo for lo, hi in spans)
        low = max(1, math.floor((need - 1) / narrowest / multiple)) * multiple
        high = math.ceil((need + 1) / narrowest / multiple) * multiple
        candidates = itertools.islice(range(low, high, multiple), 1024)
        return next((n for n in candidates if all(_pixels_inside(lo, hi, n) >= need for lo, hi in spans)), high)

    return (side([(b[0], b[2]) for b in bounds], native[0]), side([(b[1], b[3]) for b in bounds], native[1]))


def blend_weights(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From region masks `[R, ...]` to (global weight `[...]`, region weights `[R, ...]`) that sum to one.

    Where the masks add up to more than one (overlaps) they are normalised and the global output gets no weight;
    elsewhere the global output fills what the regions leave.
    """
    total = masks.sum(0)
    return 1 - total.clamp(max=1), masks / total.clamp(min=1)


class RegionalState:
    """Everything the processors share for one generation: region embeddings and the masks per resolution."""

    def __init__(self, masks: torch.Tensor, cond: list[torch.Tensor], uncond: list[torch.Tensor],
                 latent_size: tuple[int, int], classifier_free_guidance: bool) -> None:
        self.image_masks = masks
        self.cond = cond
        self.uncond = uncond
        self.latent_size = latent_size
        self.classifier_free_guidance = classifier_free_guidance
        self.masks: dict[tuple[int, int], torch.Tensor] = {}

    def layer_size(self, tokens: int) -> tuple[int, int]:
        """The (h, w) grid of a layer with `tokens` positions: the latent halved (rounding up) k times."""
        h, w = self.latent_size
        for _ in range(16):
            if h * w == tokens:
                return h, w
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        raise RuntimeError(f"no downsampling of the {self.latent_size} latent has {tokens} positions")

    def weights(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Blend weights for a layer: global `[tokens, 1]`, regions `[R, tokens, 1]` (masks kept in `self.masks`)."""
        glob, regions = blend_weights(self.masks_at(self.layer_size(tokens)).flatten(1))
        return glob[:, None], regions[..., None]

    def masks_at(self, size: tuple[int, int]) -> torch.Tensor:
        """The region masks area-downsampled to an (h, w) grid, `[R, h, w]` (cached in `self.masks`)."""
        if size not in self.masks:
            self.masks[size] = F.interpolate(self.image_masks[None], size=size, mode="area")[0]
        return self.masks[size]

    def embeddings(self, index: int, batch: int) -> torch.Tensor:
        """Region `index`'s text embeddings laid out like the pipeline's batch (`[uncond..., cond...]` with CFG)."""
        if not self.classifier_free_guidance:
            return self.cond[index].expand(batch, -1, -1)
        if batch % 2:
            raise RuntimeError(f"classifier-free guidance batch of odd size {batch}")
        half = batch // 2
        return torch.cat([self.uncond[index].expand(half, -1, -1), self.cond[index].expand(half, -1, -1)])


class RegionalAttnProcessor:
    """Cross-attention processor: the global output blended with one output per region by the region masks."""

    def __init__(self, state: RegionalState) -> None:
        self.state = state

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is None or hidden_states.ndim != 3:
            raise RuntimeError("the regional processor belongs on cross-attention layers with [B, N, C] inputs")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch, tokens, _ = hidden_states.shape
        query = _heads(attn, attn.to_q(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        glob, regions = (w.to(query.dtype) for w in self.state.weights(tokens))
        out = glob * _attend(attn, query, encoder_hidden_states, attention_mask)
        for index, weight in enumerate(regions):
            context = self.state.embeddings(index, batch).to(encoder_hidden_states)
            out = out + weight * _attend(attn, query, context, None)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _heads(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    return x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)


def _attend(attn: Attention, query: torch.Tensor, context: torch.Tensor,
            attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Multi-head attention of `query` (already split in heads) over `context`, heads merged back: `[B, N, inner]`."""
    batch = query.shape[0]
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    key, value = _heads(attn, attn.to_k(context)), _heads(attn, attn.to_v(context))
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
    return out.transpose(1, 2).reshape(batch, -1, attn.heads * key.shape[-1]).to(query.dtype)


def latent_window(mask: torch.Tensor, multiple: int) -> Window | None:
    """(rows, cols) of the bounding box of `mask > 0` (`[h, w]`), widened outward to multiples of `multiple` and
    clamped to the mask; None for an empty mask.

    Aligned windows downsample exactly through the UNet, so a window the size of the native latent is processed
    like a whole native image.
    """
    inside = mask > 0
    rows, cols = inside.any(1).nonzero().flatten(), inside.any(0).nonzero().flatten()
    if not len(rows):
        return None

    def snap(lo: int, hi: int, n: int) -> slice:
        return slice(lo // multiple * multiple, min(n, -(-hi // multiple) * multiple))

    return snap(int(rows[0]), int(rows[-1]) + 1, mask.shape[0]), snap(int(cols[0]), int(cols[-1]) + 1, mask.shape[1])


def unet_multiple(unet: UNet2DConditionModel) -> int:
    """The UNet's total downsampling factor: one halving between consecutive down blocks."""
    return 2 ** (len(unet.config.block_out_channels) - 1)


class LatentWindowForward:
    """Stands in for `UNet2DConditionModel.forward`: each region denoised on its own latent window, blended.

    Region `i` predicts noise on its window (`latent_window` of its mask at latent resolution) with its own prompt;
    the global prompt predicts on the whole latent, and only if some place is not fully covered by regions. The
    predictions are blended with `blend_weights` of the latent-resolution masks. The samplers' updates are linear in
    the noise predictions and the weights stay fixed over the steps, so blending predictions equals blending the
    per-window denoised latents, as MultiDiffusion does. Live adapters apply to every pass (same UNet modules).
    """

    def __init__(self, state: RegionalState, forward, multiple: int, prompts: Sequence[str] = (),
                 scope: ConceptScope | None = None) -> None:
        self.state = state
        self.forward = forward
        self.multiple = multiple
        self.prompts = prompts  # the regions' prompts, for `scope`
        self.scope = scope

    def windows(self, size: tuple[int, int]) -> list[Window | None]:
        return [latent_window(mask, self.multiple) for mask in self.state.masks_at(size)]

    def __call__(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *,
                 return_dict: bool = True, **kwargs):
        residuals = ("down_block_additional_residuals", "mid_block_additional_residual",
                     "down_intrablock_additional_residuals")
        if any(kwargs.get(name) is not None for name in residuals):
            raise SpectralDiffusionError("latent region mode cannot crop ControlNet/adapter residuals; "
                                         "use region mode 'attention'")
        size = (sample.shape[-2], sample.shape[-1])
        glob, weights = blend_weights(self.state.masks_at(size))
        out = None
        if glob.max() > 0:
            eps = self.forward(sample, timestep, encoder_hidden_states, return_dict=False, **kwargs)[0]
            out = eps * glob.to(eps)
        region_kwargs = {**kwargs, "encoder_attention_mask": None}  # the global prompt's mask fits no region
        for index, window in enumerate(self.windows(size)):
            if window is None:
                continue
            context = self.state.embeddings(index, sample.shape[0]).to(encoder_hidden_states)
            with self.scope(self.prompts[index]) if self.scope else nullcontext():
                eps = self.forward(sample[(..., *window)], timestep, context, return_dict=False, **region_kwargs)[0]
            if out is None:
                out = eps.new_zeros(*eps.shape[:-2], *size)
            out[(..., *window)] += weights[(index, *window)].to(eps) * eps
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


@contextmanager
def _attention_processors(unet: UNet2DConditionModel, state: RegionalState) -> Iterator[None]:
    """The regional processor on every cross-attention layer for the block; the previous ones come back after."""
    cross = {name: m for name, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention}
    previous = {name: m.processor for name, m in cross.items()}
    processor = RegionalAttnProcessor(state)
    try:
        for module in cross.values():
            module.set_processor(processor)
        yield
    finally:
        for name, module in cross.items():
            module.set_processor(previous[name])


@contextmanager
def _latent_windows(unet: UNet2DConditionModel, state: RegionalState, prompts: Sequence[str],
                    scope: ConceptScope | None) -> Iterator[None]:
    """`unet.forward` replaced by a `LatentWindowForward` for the block (`nn.Module.__call__` looks `forward` up
    on the instance first); an instance `forward` that was there before (accelerate's hooks) comes back after."""
    own = vars(unet).get("forward")
    unet.forward = LatentWindowForward(state, unet.forward, unet_multiple(unet), prompts, scope)
    try:
        yield
    finally:
        if own is None:
            del unet.forward
        else:
            unet.forward = own


@contextmanager
def regional_prompting(pipe: StableDiffusionPipeline, regions: Sequence[Region], *, height: int, width: int,
                       negative_prompt: str = "", classifier_free_guidance: bool = True,
                       mode: str = "attention",
                       scope: ConceptScope | None = None) -> Iterator[RegionalState | None]:
    """Install regional prompting on `pipe.unet` for the block; the UNet is as before after it.

    `scope` (latent mode only; `Composer.scope`): each region's pass runs inside `scope(its prompt)`, which applies
    only the live concepts that prompt names, so one subject's adapter never draws in another's window.

    `height`/`width` are the image size of the generation run inside the block, `classifier_free_guidance` whether
    that run uses CFG (diffusers: `guidance_scale > 1`), `mode` one of `REGION_MODES` (`resolve_region_mode` turns
    `auto` into one). With no regions this changes nothing (yields None).
    """
    check_region_mode(mode, REGION_MODES)
    if not regions:
        yield None
        return
    scale = pipe.vae_scale_factor
    if height % scale or width % scale:
        raise SpectralDiffusionError(f"image size {width}x{height} must be a multiple of {scale}")
    device = pipe._execution_device
    cond, uncond = [], []
    with torch.no_grad():
        for region in regions:
            negative = negative_prompt if region.negative is None else region.negative
            # the region's text encoding, like its UNet passes, sees only its own concepts' adapters
            with scope(region.prompt) if scope is not None and mode == "latent" else nullcontext():
                pos, neg = pipe.encode_prompt(region.prompt, device, 1, classifier_free_guidance, negative)
            cond.append(pos)
            uncond.append(neg)
    masks = torch.stack([region_mask(r, height, width) for r in regions]).to(device)
    state = RegionalState(masks, cond, uncond, (height // scale, width // scale), classifier_free_guidance)
    if mode == "latent":
        installed = _latent_windows(pipe.unet, state, [region.prompt for region in regions], scope)
    else:
        installed = _attention_processors(pipe.unet, state)
    with installed:
        yield state
