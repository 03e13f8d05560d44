"""Regional prompts: parsing, masks at every attention resolution, blending, CFG / batches / schedulers."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from spectral_diffusion.compose import Composer
from spectral_diffusion.concept_file import save_concept
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.generation import make_scheduler
from spectral_diffusion.regional import (
    Region,
    blend_weights,
    fitting_canvas,
    latent_window,
    parse_region,
    parse_regions,
    region_mask,
    regional_prompting,
    resolve_region_mode,
    unet_multiple,
)
from spectral_diffusion.testing.tiny_sd import random_concept

PROMPT = "a photo of a dog"


def test_parse_region_uses_last_colon_and_box() -> None:
    region = parse_region("a dog: sitting, left:0,0.25,0.5,1", negative="blue")
    assert region.prompt == "a dog: sitting, left"
    assert region.box == (0.0, 0.25, 0.5, 1.0)
    assert region.negative == "blue"
    assert parse_region(region.describe(), negative="blue") == region


@pytest.mark.parametrize(("spec", "message"), [
    ("a dog", "expected 'PROMPT:x0,y0,x1,y1'"),
    (":0,0,1,1", "expected 'PROMPT:x0,y0,x1,y1'"),
    ("a dog:0,0,1", "four numbers"),
    ("a dog:0,0,1,x", "four numbers"),
    ("a dog:0.5,0,0.5,1", "0 <= x0 < x1 <= 1"),
    ("a dog:0,0,1,1.5", "0 <= x0 < x1 <= 1"),
    ("a dog:missing_mask.png", "does not exist"),
])
def test_parse_region_errors_are_clear(spec: str, message: str) -> None:
    with pytest.raises(SpectralDiffusionError, match=message):
        parse_region(spec)


def test_regions_take_their_negatives_in_order_and_no_extra_one() -> None:
    left, right = parse_regions(["a dog:0,0,0.5,1", "a cat:0.5,0,1,1"], negatives=["blue"], feather=0.1)
    assert (left.negative, right.negative, right.feather) == ("blue", None, 0.1)
    with pytest.raises(SpectralDiffusionError) as info:
        parse_regions(["a dog:0,0,0.5,1"], negatives=["blue", "red"])
    assert str(info.value) == "2 --region-negative given for 1 --region"


def test_box_mask_covers_exactly_the_box() -> None:
    mask = region_mask(Region("x", (0.25, 0.0, 0.75, 0.5)), 8, 16)
    expected = torch.zeros(8, 16)
    expected[:4, 4:12] = 1
    assert torch.equal(mask, expected)


def test_feathered_mask_keeps_the_box_area_and_is_soft() -> None:
    mask = region_mask(Region("x", (0.25, 0.25, 0.75, 0.75), feather=0.125), 64, 64)
    assert mask.mean().item() == pytest.approx(0.25, abs=1e-6)
    assert 0 < mask[32, 16].item() < 1 and mask[32, 32].item() == 1 and mask[0, 0].item() == 0


def test_mask_image_region(tmp_path) -> None:
    img = torch.zeros(4, 8, dtype=torch.uint8)
    img[:, 4:] = 255
    path = tmp_path / "mask.png"
    Image.fromarray(img.numpy(), mode="L").save(path)
    region = parse_region(f"a cat:{path}")
    assert region.mask_path == path and region.box is None
    assert torch.equal(region_mask(region, 4, 8), img.float() / 255)


def test_blend_weights_normalise_overlaps_and_fill_with_global() -> None:
    masks = torch.tensor([[1.0, 1.0, 0.5, 0.0], [0.0, 1.0, 0.25, 0.0]])
    glob, regions = blend_weights(masks)
    assert torch.allclose(glob + regions.sum(0), torch.ones(4))
    assert torch.allclose(glob, torch.tensor([0.0, 0.0, 0.25, 1.0]))
    assert torch.allclose(regions[:, 1], torch.tensor([0.5, 0.5]))


def _run(pipe, regions, *, prompt=PROMPT, height=16, width=16, negative="", seed=0, steps=2, generator=None,
         mode="attention", **kwargs):
    """Latents of a short run of `pipe` inside `regional_prompting`, and the regional state."""
    with regional_prompting(pipe, regions, height=height, width=width, negative_prompt=negative,
                            classifier_free_guidance=kwargs.get("guidance_scale", 7.5) > 1, mode=mode) as state:
        images = pipe(prompt, negative_prompt=[negative] * len(prompt) if isinstance(prompt, list) else negative,
                      height=height, width=width, num_inference_steps=steps,
                      generator=generator or torch.Generator().manual_seed(seed), output_type="latent",
                      **kwargs).images
    return images, state


def test_masks_at_every_attention_resolution(tiny_pipe) -> None:
    # A 24x16 image has a 12x8 latent; the tiny UNet's cross-attention runs at 12x8 and 6x4.
    regions = [Region("a red cat", (0.0, 0.0, 0.5, 1.0)), Region("a blue toy", (0.5, 0.5, 1.0, 1.0))]
    _, state = _run(tiny_pipe, regions, height=16, width=24, steps=1)
    assert set(state.masks) == {(8, 12), (4, 6)}
    for (h, w), masks in state.masks.items():
        left = torch.zeros(h, w)
        left[:, : w // 2] = 1
        corner = torch.zeros(h, w)
        corner[h // 2:, w // 2:] = 1
        assert torch.equal(masks, torch.stack([left, corner]))


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_region_equal_to_global_prompt_changes_nothing(tiny_pipe, scheduler) -> None:
    tiny_pipe.scheduler = make_scheduler(scheduler, tiny_pipe.scheduler.config)
    before = dict(tiny_pipe.unet.attn_processors)
    plain, _ = _run(tiny_pipe, [], negative="blue")
    same, _ = _run(tiny_pipe, [Region(PROMPT, (0.0, 0.0, 0.5, 1.0), feather=0.2)], negative="blue")
    other, _ = _run(tiny_pipe, [Region("a red cat", (0.0, 0.0, 0.5, 1.0))], negative="blue")
    assert torch.allclose(plain, same, atol=1e-4)
    assert (plain - other).abs().max() > 1e-2
    assert tiny_pipe.unet.attn_processors == before  # processors restored


def test_region_negative_prompt_is_used(tiny_pipe) -> None:
    plain, _ = _run(tiny_pipe, [Region(PROMPT, (0.0, 0.0, 1.0, 1.0))], negative="blue")
    own, _ = _run(tiny_pipe, [Region(PROMPT, (0.0, 0.0, 1.0, 1.0), negative="green snow")], negative="blue")
    assert (plain - own).abs().max() > 1e-2


def test_two_regions_change_cross_attention_only_inside_their_boxes(tiny_pipe) -> None:
    # The first cross-attention layer sees identical inputs on the first step with and without regions, so its
    # output must change inside the boxes and stay bit-identical outside. (In the random tiny UNet, self-attention
    # spreads any change over the whole image afterwards; a trained model keeps it local.)
    first = tiny_pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    outputs = []
    hook = first.register_forward_hook(lambda module, args, out: outputs.append(out))
    try:
        _run(tiny_pipe, [], steps=1)
        regions = [Region("a red cat on the beach", (0.0, 0.0, 0.5, 0.5)),
                   Region("a green toy in the snow", (0.5, 0.5, 1.0, 1.0))]
        _run(tiny_pipe, regions, steps=1)
    finally:
        hook.remove()
    plain, mixed = outputs[0], outputs[len(outputs) // 2]
    change = (mixed - plain).abs().amax(dim=(0, 2)).view(8, 8)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[:4, :4] = inside[4:, 4:] = True
    assert change[~inside].max() == 0
    assert change[inside].min() > 1e-4


def test_batches_and_images_per_prompt_match_single_runs(tiny_pipe) -> None:
    regions = [Region("a red cat", (0.0, 0.0, 0.5, 1.0)), Region("a blue toy", (0.25, 0.0, 1.0, 1.0))]
    prompts = [PROMPT, "a green toy in the city"]
    generators = [torch.Generator().manual_seed(s) for s in range(4)]
    batch, _ = _run(tiny_pipe, regions, prompt=prompts, num_images_per_prompt=2, generator=generators)
    assert batch.shape[0] == 4
    for index in (0, 3):
        alone, _ = _run(tiny_pipe, regions, prompt=prompts[index // 2], seed=index)
        assert torch.allclose(batch[index], alone[0], atol=1e-4)


def test_without_guidance(tiny_pipe) -> None:
    plain, _ = _run(tiny_pipe, [], guidance_scale=1.0)
    same, _ = _run(tiny_pipe, [Region(PROMPT, (0.0, 0.0, 0.5, 0.5))], guidance_scale=1.0)
    assert torch.allclose(plain, same, atol=1e-4)


def test_regions_see_live_adapters(tmp_path, tiny_pipe) -> None:
    concept = random_concept(tiny_pipe, band=0, token="<dogA>", seed=1)
    Composer(tiny_pipe).set_concepts({save_concept(tmp_path / "dogA.safetensors", concept): 1.0})
    plain, _ = _run(tiny_pipe, [], prompt="a photo of <dogA>")
    same, _ = _run(tiny_pipe, [Region("a photo of <dogA>", (0.0, 0.0, 0.5, 1.0))], prompt="a photo of <dogA>")
    assert torch.allclose(plain, same, atol=1e-4)


# ---- latent mode (window denoising) ----------------------------------------------------------------------------
# The tiny UNet: native latent 8x8 (16x16 images, VAE factor 2), two down blocks, so windows snap to multiples of 2.


def test_latent_window_snaps_outward_to_the_unet_multiple() -> None:
    mask = torch.zeros(16, 24)
    mask[3:10, 5:18] = 0.5
    assert latent_window(mask, 4) == (slice(0, 12), slice(4, 20))
    assert latent_window(mask, 1) == (slice(3, 10), slice(5, 18))
    edge = torch.zeros(10, 10)
    edge[7:, 9:] = 1
    assert latent_window(edge, 8) == (slice(0, 10), slice(8, 10))  # clamped to the latent
    assert latent_window(torch.zeros(4, 4), 2) is None


def test_latent_window_of_an_unaligned_box_covers_it(tiny_pipe) -> None:
    # Box 0.3..0.55 x 0.1..0.9 of a 64x48 image: latent 24x32, mask columns 9..17 (partly), rows 2..22.
    multiple = unet_multiple(tiny_pipe.unet)
    assert multiple == 2
    region = Region("a red cat", (0.3, 0.1, 0.55, 0.9))
    mask = torch.nn.functional.interpolate(region_mask(region, 48, 64)[None, None], size=(24, 32), mode="area")[0, 0]
    rows, cols = latent_window(mask, multiple)
    assert all(s.start % multiple == 0 and s.stop % multiple == 0 for s in (rows, cols))
    inside = mask.nonzero()
    assert rows.start <= inside[:, 0].min() and inside[:, 0].max() < rows.stop
    assert cols.start <= inside[:, 1].min() and inside[:, 1].max() < cols.stop
    assert (rows.stop - rows.start, cols.stop - cols.start) == (20, 10)


def test_latent_mode_whole_image_region_with_the_global_prompt_changes_nothing(tiny_pipe) -> None:
    # One region covering the canvas: the global weight is 0 everywhere (its pass is skipped) and the region's weight
    # is exactly 1, so the region's prediction on the whole latent with the same embeddings comes back unchanged
    # (x * 1.0 + 0.0 is exact); only kernel nondeterminism could differ, hence a tolerance far below any real change.
    tiny_pipe.scheduler = make_scheduler("ddim", tiny_pipe.scheduler.config)
    plain, _ = _run(tiny_pipe, [], negative="blue", width=32)
    same, _ = _run(tiny_pipe, [Region(PROMPT, (0.0, 0.0, 1.0, 1.0))], negative="blue", width=32, mode="latent")
    other, _ = _run(tiny_pipe, [Region("a red cat", (0.0, 0.0, 1.0, 1.0))], negative="blue", width=32,
                    mode="latent")
    assert torch.allclose(plain, same, rtol=0, atol=1e-6)
    assert (plain - other).abs().max() > 1e-2


def test_latent_mode_left_half_is_the_native_image_of_the_left_prompt(tiny_pipe) -> None:
    # Left | right at twice the native width: the windows are the two native 8x8 halves and cover the canvas, so with
    # DDIM (eta 0, deterministic, per-pixel update) and the same initial noise, the left half of the latents is what a
    # native-size run of the left prompt alone gives from the left crop of that noise. Both runs make the same UNet
    # calls on the same numbers (bit-equal on CPU); the tolerance only allows another summation order for a crop.
    tiny_pipe.scheduler = make_scheduler("ddim", tiny_pipe.scheduler.config)
    noise = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(3))
    regions = [Region("a red cat", (0.0, 0.0, 0.5, 1.0)), Region("a green toy in the snow", (0.5, 0.0, 1.0, 1.0))]
    wide, _ = _run(tiny_pipe, regions, prompt=PROMPT, width=32, latents=noise.clone(), mode="latent")
    left, _ = _run(tiny_pipe, [], prompt="a red cat", latents=noise[..., :8].clone())
    right, _ = _run(tiny_pipe, [], prompt="a green toy in the snow", latents=noise[..., 8:].clone())
    assert torch.allclose(wide[..., :8], left, rtol=0, atol=1e-5)
    assert torch.allclose(wide[..., 8:], right, rtol=0, atol=1e-5)
    assert (left - right).abs().max() > 1e-2


def test_latent_mode_blends_region_windows_with_the_global_prediction(tiny_pipe) -> None:
    # The UNet stand-in directly: a region on latent columns 0..4 (window snapped out to columns 0..5) and nothing
    # on the right. Inside the box its own window prediction, outside the box the global prediction.
    unet = tiny_pipe.unet
    sample = torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(0))
    glob_emb = torch.cat(tiny_pipe.encode_prompt(PROMPT, "cpu", 1, True, "")[::-1])
    with torch.no_grad(), regional_prompting(tiny_pipe, [Region("a red cat", (0.0, 0.0, 0.3125, 1.0))], height=16,
                                              width=32, mode="latent") as state:
        out = unet(sample, 10, encoder_hidden_states=glob_emb).sample
        (tup,) = unet(sample, 10, encoder_hidden_states=glob_emb, return_dict=False)
        region_emb = state.embeddings(0, 2)
    with torch.no_grad():
        window = unet(sample[..., :6], 10, encoder_hidden_states=region_emb).sample
        whole = unet(sample, 10, encoder_hidden_states=glob_emb).sample
    assert torch.equal(out, tup)
    assert torch.allclose(out[..., :5], window[..., :5], rtol=0, atol=1e-6)
    assert torch.allclose(out[..., 5:], whole[..., 5:], rtol=0, atol=1e-6)
    assert (window[..., :5] - whole[..., :5]).abs().max() > 1e-3


def _boxes(*boxes: tuple[float, float, float, float]) -> list[Region]:
    return [Region(f"subject {i}", box) for i, box in enumerate(boxes)]


HALVES = _boxes((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0))
THIRDS = _boxes((0.0, 0.0, 0.333, 1.0), (0.333, 0.0, 0.667, 1.0), (0.667, 0.0, 1.0, 1.0))  # as people type them


@pytest.mark.parametrize(("regions", "size", "native", "mode"), [
    (HALVES, (128, 64), (64, 64), "latent"),  # the toy model: each half a whole 64x64 window
    (HALVES, (64, 64), (64, 64), "attention"),  # 32-wide halves are under its native size
    (HALVES, (120, 64), (64, 64), "attention"),
    (HALVES, (768, 512), (512, 512), "attention"),  # SD 1.5, two half-width regions
    (HALVES, (1024, 512), (512, 512), "latent"),
    (HALVES, (128, 56), (64, 64), "attention"),  # both directions count
    (THIRDS, (192, 64), (64, 64), "latent"),  # 0.333 * 192 = 63.9, yet 64 pixel centres lie inside each box
    (THIRDS, (184, 64), (64, 64), "attention"),
    (_boxes((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 0.9, 1.0)), (128, 64), (64, 64), "attention"),  # every region must
    ([], (128, 64), (64, 64), "attention"),
])
def test_auto_region_mode_is_latent_when_every_region_spans_the_native_size(regions, size, native, mode) -> None:
    assert resolve_region_mode("auto", regions, size, native) == mode
    for explicit in ("attention", "latent"):
        assert resolve_region_mode(explicit, regions, size, native) == explicit


@pytest.mark.parametrize(("regions", "native", "canvas"), [
    (HALVES, (64, 64), (128, 64)),
    (HALVES, (512, 512), (1024, 512)),
    (HALVES, (16, 16), (32, 16)),
    (_boxes((0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)), (64, 64), (64, 128)),
    (THIRDS, (64, 64), (192, 64)),
    (_boxes((0.1, 0.2, 0.35, 0.9)), (64, 64), (256, 96)),  # 0.25 x 0.7 of the canvas
    (_boxes((0.0, 0.0, 1.0, 1.0)), (64, 64), (64, 64)),
    ([], (64, 64), (64, 64)),  # no regions: the native size
])
def test_fitting_canvas_is_the_smallest_on_which_auto_picks_latent(regions, native, canvas) -> None:
    assert fitting_canvas(regions, native, 8) == canvas
    if regions:
        width, height = canvas
        assert resolve_region_mode("auto", regions, canvas, native) == "latent"
        assert resolve_region_mode("auto", regions, (width - 8, height), native) == "attention"
        assert resolve_region_mode("auto", regions, (width, height - 8), native) == "attention"


def test_fitting_a_very_narrow_region_is_quick() -> None:  # the canvas limit then refuses it (test_generation)
    assert fitting_canvas(_boxes((0.0, 0.0, 1e-9, 1.0)), (512, 512), 8)[0] > 5e11


def test_a_mask_region_counts_as_the_bounding_box_of_its_non_zero_pixels(tmp_path) -> None:
    img = Image.new("L", (40, 20))
    img.paste(128, (2, 5, 22, 15))  # a grey blob in the 20x10 box at x 0.05..0.55, y 0.25..0.75
    img.save(tmp_path / "blob.png")
    region = parse_region(f"a cat:{tmp_path / 'blob.png'}")
    assert region.bounds() == (0.05, 0.25, 0.55, 0.75)
    assert fitting_canvas([region], (16, 16), 8) == (32, 32)
    assert resolve_region_mode("auto", [region], (32, 32), (16, 16)) == "latent"
    assert resolve_region_mode("auto", [region], (32, 24), (16, 16)) == "attention"
    Image.new("L", (8, 8)).save(tmp_path / "black.png")
    with pytest.raises(SpectralDiffusionError, match="black.png is black everywhere, so the region covers nothing"):
        parse_region(f"a cat:{tmp_path / 'black.png'}")


def test_unknown_region_mode_is_refused() -> None:
    # Checked before anything else, so even a run without regions is refused (no pipeline needed).
    message = "unknown region mode 'tiles'; choose one of attention, latent"
    with pytest.raises(SpectralDiffusionError, match=message), \
            regional_prompting(None, [], height=16, width=16, mode="tiles"):  # type: ignore[arg-type]
        pass
    with pytest.raises(SpectralDiffusionError, match="unknown region mode 'auto'"), \
            regional_prompting(None, [], height=16, width=16, mode="auto"):  # type: ignore[arg-type]
        pass  # `resolve_region_mode` decides it first; `generate` does


@pytest.mark.parametrize("mode", ["attention", "latent"])
def test_unet_is_restored_after_the_block_even_on_error(tiny_pipe, mode) -> None:
    unet = tiny_pipe.unet
    forward, processors = unet.forward, dict(unet.attn_processors)
    regions = [Region("a red cat", (0.0, 0.0, 0.5, 1.0))]
    with regional_prompting(tiny_pipe, regions, height=16, width=16, mode=mode):
        assert (unet.forward != forward) == (mode == "latent")
    assert "forward" not in vars(unet) and unet.forward == forward
    with pytest.raises(ValueError, match="boom"), regional_prompting(tiny_pipe, regions, height=16, width=16,
                                                                      mode=mode):
        raise ValueError("boom")
    assert "forward" not in vars(unet) and unet.forward == forward
    assert unet.attn_processors == processors
    # An instance-level forward that was there before (as accelerate's hooks install) comes back too.
    unet.forward = own = lambda *args, **kwargs: None
    with regional_prompting(tiny_pipe, regions, height=16, width=16, mode=mode):
        pass
    assert vars(unet)["forward"] is own
