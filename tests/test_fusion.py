"""Fusion: the exact spectral sum, its refusals, the baselines' math, gradient fusion, output formats, CLI."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from spectral_diffusion.adapters.inject import load_adapter
from spectral_diffusion.adapters.layers import unwrap
from spectral_diffusion.adapters.targets import adaptable_layers, is_text_fed
from spectral_diffusion.bands import weight_matrix
from spectral_diffusion.cli import main
from spectral_diffusion.concept_file import save_concept
from spectral_diffusion.errors import SpectralDiffusionError
from spectral_diffusion.fusion import (
    GradientStats,
    _GramRecorder,
    add_tokens,
    check_request,
    dare_merge,
    fuse,
    merged_delta,
    ordinary_prompts,
    record_gradient_stats,
    record_text_stats,
    save_fused,
    ties_merge,
)
from spectral_diffusion.models import load_base
from spectral_diffusion.prompts import read_prompts
from spectral_diffusion.testing.tiny_sd import random_concept
from spectral_diffusion.tokens import token_ids


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {name: weight_matrix(m).detach().clone() for name, m in adaptable_layers(pipe.unet, pipe.text_encoder).items()}


def objective(stats: GradientStats, delta: torch.Tensor) -> float:
    """The summed squared output error of weight `W0 + delta` over every concept's recorded inputs."""
    d, s, a = delta.double(), stats.gram.double(), stats.cross.double()
    return float(((d @ s) * d).sum() - 2 * (d * a).sum()) + stats.const


@pytest.fixture
def concepts(tiny_pipe):
    return [random_concept(tiny_pipe, band=0, token="<doga>", seed=1, targets="attn+ff+conv"),
            random_concept(tiny_pipe, variant="rotational", band=1, token="<catb>", seed=2)]


# ---- tensor math -------------------------------------------------------------------------------------------


def test_ties_trims_elects_sign_and_averages_agreeing_entries() -> None:
    a = torch.tensor([3.0, -1.0, 0.5, 0.0])
    b = torch.tensor([-2.0, 1.0, 0.4, 1.5])
    # density 0.5 keeps a: [3, -1, 0, 0], b: [-2, 0, 0, 1.5]; signs by mass: [+, -, 0, +].
    assert torch.equal(ties_merge([a, b], 0.5), torch.tensor([3.0, -1.0, 0.0, 1.5]))
    c = torch.tensor([1.0, 1.0, -4.0, 2.0])
    # density 1 keeps all; entry 0: 3 - 2 + 1 > 0 -> mean(3, 1); entry 2: -4 wins; a's zero never votes.
    assert torch.allclose(ties_merge([a, b, c], 1.0), torch.tensor([2.0, 1.0, -4.0, 1.75]))


def test_dare_keeps_a_seeded_fraction_rescaled() -> None:
    delta = torch.randn(200, 300, generator=torch.Generator().manual_seed(0))
    merged = dare_merge([delta], 0.3, [torch.Generator().manual_seed(5)])
    kept = merged != 0
    assert kept.float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert torch.allclose(merged[kept], delta[kept] / 0.3)
    again = dare_merge([delta], 0.3, [torch.Generator().manual_seed(5)])
    assert torch.equal(merged, again)
    assert dare_merge([delta], 1.0, [torch.Generator()]).equal(delta)


def test_gradient_stats_score_and_solve_the_objective() -> None:
    gen = torch.Generator().manual_seed(0)
    out_f, in_f = 6, 10
    inputs = [torch.randn(in_f, 40, generator=gen), torch.randn(in_f, 25, generator=gen)]
    factors = [(torch.randn(out_f, 2, generator=gen), torch.randn(2, in_f, generator=gen)), None]
    stats = GradientStats.zeros(out_f, in_f, torch.device("cpu"))
    for x, f in zip(inputs, factors, strict=True):
        stats.add(x @ x.mT, f)
    deltas = [f[0] @ f[1] if f else torch.zeros(out_f, in_f) for f in factors]

    def explicit(d: torch.Tensor) -> float:
        return sum(float(((d - dw) @ x).pow(2).sum()) for dw, x in zip(deltas, inputs, strict=True))

    probe = torch.randn(out_f, in_f, generator=gen)
    assert objective(stats, probe) == pytest.approx(explicit(probe), rel=1e-5)
    best = stats.solve(ridge=1e-8)
    mean = sum(deltas) / 2
    assert objective(stats, best) < objective(stats, mean)
    assert objective(stats, best) < objective(stats, best + 1e-2 * probe)
    # the normal equations hold: D S = A
    assert torch.allclose(best @ stats.gram, stats.cross, atol=1e-3)


# ---- fusing ------------------------------------------------------------------------------------------------


def test_spectral_fusion_is_the_exact_weighted_sum(tiny_pipe, concepts) -> None:
    before = _weights(tiny_pipe)
    report = fuse(concepts, tiny_pipe, weights=[1.0, 0.7])
    after = _weights(tiny_pipe)
    touched = set(concepts[0].layers) | set(concepts[1].layers)
    for name, w0 in before.items():
        expected = w0.clone()
        for concept, weight in zip(concepts, (1.0, 0.7), strict=True):
            if name in concept.layers:
                up, down = concept.delta_factors(name)
                expected += weight * up @ down
        assert torch.allclose(after[name], expected, atol=1e-6), name
        assert (name in touched) == (not torch.equal(after[name], w0))
    emb = tiny_pipe.text_encoder.get_input_embeddings().weight
    for concept in concepts:
        assert torch.equal(emb[token_ids(tiny_pipe.tokenizer, concept.meta.token_names)], concept.token_embeddings)
    assert report.method == "spectral" and report.weights == [1.0, 0.7] and report.layers == len(touched)
    assert [c.band for c in report.concepts] == [0, 1] and report.timings["total"] > 0


@pytest.mark.parametrize(("edit", "message"), [
    (lambda cs: setattr(cs[1].meta, "band", 0), r"<doga> \(band 0, rank 4\) and <catb> \(band 0, rank 4\) share "
                                                 r"singular-vector columns \[0, 4\)"),
    (lambda cs: setattr(cs[1].meta, "base_fingerprint", "0123456789abcdef"),
     r"concept <catb> was trained on base model 0123456789abcdef, but the loaded base is [0-9a-f]{16}"),
    (lambda cs: setattr(cs[1].meta, "token_names", ["<doga>", "<doga>_1"]), "both use the token '<doga>'"),
    (lambda cs: setattr(cs[1].meta, "token", "dog"), "already in the tokenizer"),
    (lambda cs: setattr(cs[0].meta, "variant", "lora"), "spectral fusion needs additive or rotational"),
])
def test_refusals_leave_the_pipeline_untouched(tiny_pipe, concepts, edit, message) -> None:
    if "lora" in message:
        concepts[0] = random_concept(tiny_pipe, variant="lora", token="<doga>")
    else:
        edit(concepts)
    before, vocab = _weights(tiny_pipe), len(tiny_pipe.tokenizer)
    with pytest.raises(SpectralDiffusionError, match=message):
        fuse(concepts, tiny_pipe)
    assert len(tiny_pipe.tokenizer) == vocab
    assert all(torch.equal(w, _weights(tiny_pipe)[n]) for n, w in before.items())


def test_argument_errors(tiny_pipe, concepts) -> None:
    with pytest.raises(SpectralDiffusionError, match="1 weights given for 2 concepts"):
        fuse(concepts, tiny_pipe, weights=[1.0])
    with pytest.raises(SpectralDiffusionError, match="unknown fusion method 'avg'"):
        fuse(concepts, tiny_pipe, "avg")
    with pytest.raises(SpectralDiffusionError, match="density must be in"):
        fuse(concepts, tiny_pipe, "ties", density=0)


def test_the_request_is_checked_before_a_base_loads(tmp_path, concepts) -> None:
    """`check_request` is what `fuse` refuses without the pipeline, in the words the CLI prints."""
    assert check_request(concepts, weights=[1, 0.5]) == [1.0, 0.5]
    missing = str(tmp_path / "missing.safetensors")
    for args, kwargs, message in [
        ((concepts, "gradient"), {"record_steps": 0}, "--record-steps must be >= 1, got 0"),
        ((concepts, "spectral", [1.0]), {}, "1 weights given for 2 concepts"),
        (([missing],), {}, f"concept file {missing} not found"),
        ((concepts, "sum"), {"prior_prompts": ["a dog"]}, "prior prompts are for closed-form fusion; sum does not "
                                                          "use them"),
    ]:
        with pytest.raises(SpectralDiffusionError) as info:
            check_request(*args, **kwargs)
        assert str(info.value) == message
    (tmp_path / "prompts.txt").write_text(" a dog \n\nthe sea\n", encoding="utf-8")
    assert read_prompts(tmp_path / "prompts.txt") == ["a dog", "the sea"]
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(SpectralDiffusionError, match=r"^--prior-prompts .*latin1.txt: cannot read it as UTF-8 text"):
        read_prompts(tmp_path / "latin1.txt")
    (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(SpectralDiffusionError, match=r"^--locality-captions .*blank.txt: the file holds no prompt"):
        read_prompts(tmp_path / "blank.txt", "--locality-captions")


def test_allow_overlap_warns_and_fuses(tiny_pipe, concepts) -> None:
    concepts[1].meta.band = 0
    with pytest.warns(UserWarning, match="share singular-vector columns"):
        report = fuse(concepts, tiny_pipe, allow_overlap=True)
    assert report.layers > 0


def test_baselines_on_every_variant(tiny_pipe, tiny_model_dir) -> None:
    concepts = [random_concept(tiny_pipe, variant=v, band=i, token=f"<c{i}>", seed=i)
                for i, v in enumerate(("lora", "ortho", "additive"))]
    per_method = {}
    for method in ("sum", "mean", "ties", "dare"):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
        before = _weights(pipe)
        fuse(concepts, pipe, method, weights=[1.0, 0.5, 2.0], density=0.4, seed=3)
        per_method[method] = {n: w - before[n] for n, w in _weights(pipe).items() if n in concepts[0].layers}
    for name, total in per_method["sum"].items():
        assert torch.allclose(per_method["mean"][name], total / 3, atol=1e-6)
        factors = [((w * c.delta_factors(name)[0]), c.delta_factors(name)[1])
                   for c, w in zip(concepts, (1.0, 0.5, 2.0), strict=True)]
        assert torch.allclose(total, sum(u @ d for u, d in factors), atol=1e-5)
        assert torch.allclose(per_method["ties"][name], merged_delta("ties", name, factors, density=0.4), atol=1e-6)
        assert torch.allclose(per_method["dare"][name],
                              merged_delta("dare", name, factors, density=0.4, seed=3), atol=1e-6)
        assert not torch.allclose(per_method["dare"][name], total, atol=1e-3)


def test_gradient_fusion_beats_mean_on_its_own_objective(tiny_pipe, concepts) -> None:
    add_tokens(tiny_pipe, concepts)
    before = _weights(tiny_pipe)
    weights = [1.0, 0.7]
    factors: dict[str, list] = {}
    for i, (concept, w) in enumerate(zip(concepts, weights, strict=True)):
        for name in concept.layers:
            up, down = concept.delta_factors(name)
            factors.setdefault(name, [None, None])[i] = (w * up, down)
    stats = record_gradient_stats(tiny_pipe, [(c, None) for c in concepts], weights, factors, steps=1)
    assert set(stats) == set(factors)
    total_gradient = total_mean = 0.0
    for name, s in stats.items():
        assert s.gram.trace() > 0
        mean = merged_delta("mean", name, factors[name]) / 2
        total_gradient += objective(s, s.solve(1e-4))
        total_mean += objective(s, mean)
    assert total_gradient < 0.5 * total_mean
    after = _weights(tiny_pipe)  # recording leaves the pipeline as it was: no adapters, same weights
    assert after.keys() == before.keys() and all(torch.equal(after[n], w) for n, w in before.items())


def test_gram_recorder_matches_the_layer_inputs(tiny_pipe) -> None:
    modules = adaptable_layers(tiny_pipe.unet, tiny_pipe.text_encoder)
    names = [n for n in modules if n.endswith((".layers.0.self_attn.q_proj", ".layers.0.self_attn.k_proj",
                                               "down_blocks.0.attentions.0.proj_in", "transformer_blocks.0.attn2.to_v",
                                               "down_blocks.0.resnets.0.conv1", "down_blocks.0.downsamplers.0.conv"))]
    # text q/k of layer 0, one 1x1 proj_in, every attn2.to_v, a 3x3 resnet conv and the strided downsampler
    assert len(names) == 12
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0].detach().clone()))
               for n in names]
    recorder = _GramRecorder({n: modules[n] for n in names})
    tiny_pipe("a photo of a dog", num_inference_steps=2, output_type="latent")
    recorder.remove()
    for handle in handles:
        handle.remove()
    for name in names:
        conv = unwrap(modules[name])
        x = torch.cat([F.unfold(t, conv.kernel_size, conv.dilation, conv.padding, conv.stride).mT.flatten(0, 1)
                       if t.ndim == 4 else t.reshape(-1, t.shape[-1]) for t in inputs[name]])
        assert torch.allclose(recorder.grams[name], x.mT @ x, rtol=1e-4, atol=1e-3), name


def test_gradient_fusion_end_to_end(tiny_pipe, concepts) -> None:
    before = _weights(tiny_pipe)
    report = fuse(concepts, tiny_pipe, "gradient", record_steps=1, record_size=16)
    assert {"record", "solve", "total"} <= set(report.timings) and report.options["ridge"] == 1e-4
    changed = [n for n, w in _weights(tiny_pipe).items() if not torch.equal(w, before[n])]
    assert set(changed) == set(concepts[0].layers) | set(concepts[1].layers)


def _factors(concepts, weights) -> dict[str, list]:
    factors: dict[str, list] = {}
    for i, (concept, w) in enumerate(zip(concepts, weights, strict=True)):
        for name in concept.layers:
            up, down = concept.delta_factors(name)
            factors.setdefault(name, [None] * len(concepts))[i] = (w * up, down)
    return factors


def _latents(pipe, prompt: str) -> torch.Tensor:
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images


def test_token_only_concepts_leave_a_fused_identity_exactly_as_alone(tiny_model_dir, tiny_pipe) -> None:
    """The plumbing control: concepts whose weight changes are zero (token rows only) change nothing for another."""
    main_concept = random_concept(tiny_pipe, band=0, token="<doga>", seed=1, targets="kv")
    others = [random_concept(tiny_pipe, band=b, token=f"<other{b}>", seed=b, targets="attn+ff+conv") for b in (1, 2)]
    for concept in others:
        for state in concept.layers.values():
            for key in ("A", "B", "c"):
                state[key] = torch.zeros_like(state[key])
    assert all(not (lambda up, down: (up @ down).any())(*concept.delta_factors(n))
               for concept in others for n in concept.layers)
    alone = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    alone.set_progress_bar_config(disable=True)
    fuse([main_concept], alone)
    fuse([main_concept, *others], tiny_pipe)
    prompt = "a photo of <doga> dog"
    assert torch.allclose(_latents(tiny_pipe, prompt), _latents(alone, prompt), atol=1e-6)


def test_closed_form_beats_the_sum_on_its_own_objective(tiny_pipe) -> None:
    concepts = [random_concept(tiny_pipe, band=b, token=f"<c{b}>", seed=b, targets="kv") for b in range(3)]
    for b, concept in enumerate(concepts):
        concept.meta.training["captions"] = [f"a photo of <c{b}> dog in the snow", f"<c{b}> dog on a sofa"]
    add_tokens(tiny_pipe, concepts)
    before = _weights(tiny_pipe)
    weights = [1.0, 0.8, 1.0]
    factors = _factors(concepts, weights)
    stats = record_text_stats(tiny_pipe, [(c, None) for c in concepts], weights, factors)
    assert set(stats) == set(factors) and all(is_text_fed(n) for n in stats)
    closed = sum(objective(s, s.solve(1e-4)) for s in stats.values())
    summed = sum(objective(s, merged_delta("sum", n, factors[n])) for n, s in stats.items())
    assert closed < 0.5 * summed
    after = _weights(tiny_pipe)  # recording leaves the pipeline as it was
    assert all(torch.equal(after[n], w) for n, w in before.items())
    assert "" in ordinary_prompts([c.meta for c in concepts])
    assert "a photo of dog in the snow" in ordinary_prompts([c.meta for c in concepts])


def test_closed_form_keeps_one_concept_exact_without_prior(tiny_pipe) -> None:
    """One concept's targets are consistent, so with no ordinary prompts the solve maps its prompts' encodings as
    its own model does (up to the ridge), though the fused weight differs from `W0 + dW` elsewhere."""
    concept = random_concept(tiny_pipe, band=0, token="<doga>", seed=4, targets="unet.*.attn2.to_[kv]")
    name = next(iter(concept.layers))
    w0 = _weights(tiny_pipe)[name]
    report = fuse([concept], tiny_pipe, "closed-form", prior_weight=0.0, ridge=1e-6)
    assert report.options == {"ridge": 1e-6, "prior_weight": 0.0, "prior_prompts": []} and "record" in report.timings
    hidden = tiny_pipe.encode_prompt(["a photo of <doga> dog"], "cpu", 1, False)[0][0]
    up, down = concept.delta_factors(name)
    own = hidden @ (w0 + up @ down).mT
    assert torch.allclose(hidden @ _weights(tiny_pipe)[name].mT, own, atol=1e-4 * own.abs().max().item())


def test_closed_form_keeps_one_concepts_text_encodings_exact_without_prior(tiny_pipe, tiny_model_dir) -> None:
    """Text encoder adapted too: each text-fed layer maps the inputs of the concept's own model as that model does, so
    layer after layer the fused model's inputs stay the own model's, and so do the encodings of its prompt."""
    concept = random_concept(tiny_pipe, band=0, token="<doga>", seed=4, targets="kv")
    own = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    add_tokens(own, [concept])
    load_adapter(own.unet, own.text_encoder, "additive", concept.layers, name="own")
    fuse([concept], tiny_pipe, "closed-form", prior_weight=0.0, ridge=1e-6)
    prompt = ["a photo of <doga> dog"]
    expected = own.encode_prompt(prompt, "cpu", 1, False)[0]
    assert torch.allclose(tiny_pipe.encode_prompt(prompt, "cpu", 1, False)[0], expected,
                          atol=1e-4 * expected.abs().max().item())


def test_a_solve_refuses_a_ridge_too_small_for_its_inputs_in_one_line() -> None:
    """Inputs along one direction of three: without a ridge the weight is not determined (`--ridge 0`)."""
    stats = GradientStats.zeros(2, 3, torch.device("cpu"))
    stats.add(torch.diag(torch.tensor([1.0, 0.0, 0.0])), (torch.ones(2, 1), torch.ones(1, 3)))
    with pytest.raises(SpectralDiffusionError, match=r"span too few directions .* at ridge 0; give a larger --ridge"):
        stats.solve(0.0)
    assert torch.allclose(stats.solve(1e-3), torch.tensor([[1.0, 0.0, 0.0]] * 2) / (1 + 1e-3 / 3), atol=1e-6)


def test_closed_form_prior_prompts_keep_the_base_mapping(tiny_pipe) -> None:
    concept = random_concept(tiny_pipe, band=0, token="<doga>", seed=4, targets="unet.*.attn2.to_[kv]")
    name = next(iter(concept.layers))
    w0 = _weights(tiny_pipe)[name]
    ordinary = "a photo of a cat in the snow"
    report = fuse([concept], tiny_pipe, "closed-form", prior_prompts=[ordinary], prior_weight=1e4)
    assert report.options["prior_prompts"] == [ordinary]
    hidden = tiny_pipe.encode_prompt([ordinary], "cpu", 1, False)[0][0]
    base = hidden @ w0.mT
    assert torch.allclose(hidden @ _weights(tiny_pipe)[name].mT, base, atol=1e-2 * base.abs().max().item())
    up, down = concept.delta_factors(name)
    assert (hidden @ (up @ down).mT).abs().max() > 0.1 * base.abs().max()  # the concept alone would move it


def test_closed_form_sums_the_layers_that_do_not_read_the_text(tiny_pipe) -> None:
    concepts = [random_concept(tiny_pipe, band=b, token=f"<c{b}>", seed=b, targets="attn") for b in range(2)]
    before = _weights(tiny_pipe)
    fuse(concepts, tiny_pipe, "closed-form")
    after = _weights(tiny_pipe)
    image_side = [n for n in concepts[0].layers if not is_text_fed(n)]
    assert image_side
    for name in image_side:
        expected = before[name] + sum(c.delta_factors(name)[0] @ c.delta_factors(name)[1] for c in concepts)
        assert torch.allclose(after[name], expected, atol=1e-6), name


def test_non_finite_weights_are_refused(tiny_pipe, concepts) -> None:
    for bad in (float("nan"), float("inf")):
        with pytest.raises(SpectralDiffusionError, match="the weight of concept 2 must be a finite number"):
            fuse(concepts, tiny_pipe, weights=[1.0, bad])
    with pytest.raises(SpectralDiffusionError, match="prior weight must be a finite number of at least 0"):
        fuse(concepts, tiny_pipe, "closed-form", prior_weight=-1)


# ---- output ------------------------------------------------------------------------------------------------


def test_diffusers_output_loads_with_tokens(tmp_path, tiny_pipe, concepts) -> None:
    paths = [save_concept(tmp_path / f"c{i}.safetensors", c) for i, c in enumerate(concepts)]
    report = fuse(paths, tiny_pipe, weights=[1.0, 0.5])
    out = tmp_path / "fused"
    save_fused(tiny_pipe, report, out)
    loaded = StableDiffusionPipeline.from_pretrained(out)
    assert loaded.tokenizer.tokenize("a <doga> and <catb>") == tiny_pipe.tokenizer.tokenize("a <doga> and <catb>")
    assert all(torch.equal(w, _weights(tiny_pipe)[n]) for n, w in _weights(loaded).items())
    assert torch.equal(loaded.text_encoder.get_input_embeddings().weight,
                       tiny_pipe.text_encoder.get_input_embeddings().weight)
    record = json.loads((out / "fusion.json").read_text())
    assert record["method"] == "spectral" and record["weights"] == [1.0, 0.5]
    assert [c["path"] for c in record["concepts"]] == [str(p) for p in paths]
    assert record["concepts"][1]["band"] == 1 and record["concepts"][0]["token_names"] == ["<doga>", "<doga>_1"]
    assert record["concepts"][0]["base_fingerprint"] == record["base_fingerprint"]
    with pytest.raises(SpectralDiffusionError, match="already exists"):
        save_fused(tiny_pipe, report, out)
    save_fused(tiny_pipe, report, out, "lora", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["embeddings", "fused.safetensors", "fusion.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_lora_output_is_the_exact_merged_delta(tmp_path, tiny_pipe, concepts) -> None:
    before = _weights(tiny_pipe)
    report = fuse(concepts, tiny_pipe, weights=[0.5, 2.0])
    save_fused(tiny_pipe, report, tmp_path / "out", "lora")
    tensors = load_file(tmp_path / "out" / "out.safetensors")
    for name, weight in _weights(tiny_pipe).items():
        component, _, path = name.partition(".")
        if component == "text_encoder" and not path.startswith("text_model."):
            path = "text_model." + path
        key = f"{component}.{path}"
        if f"{key}.lora_A.weight" not in tensors:
            assert torch.equal(weight, before[name])
            continue
        down, up = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        delta = (up.flatten(1) @ down.flatten(1)).view_as(weight)
        assert torch.allclose(before[name] + delta, weight, atol=1e-6)
    emb = load_file(tmp_path / "out" / "embeddings" / "<catb>.safetensors")
    assert torch.equal(emb["<catb>"], concepts[1].token_embeddings)


def test_lora_output_refused_for_dense_methods(tmp_path, tiny_pipe, concepts) -> None:
    report = fuse(concepts, tiny_pipe, "ties")
    with pytest.raises(SpectralDiffusionError, match="--format lora needs"):
        save_fused(tiny_pipe, report, tmp_path / "out", "lora")
    assert not (tmp_path / "out").exists()


def test_single_file_output_loads(tmp_path, tiny_model_dir, tiny_pipe, concepts) -> None:
    report = fuse(concepts, tiny_pipe)
    save_fused(tiny_pipe, report, tmp_path / "sf", "single-file")
    loaded = load_base(str(tmp_path / "sf" / "sf.safetensors"), device="cpu", config=tiny_model_dir)
    fused = _weights(tiny_pipe)
    assert all(torch.equal(w, fused[n]) for n, w in _weights(loaded).items())
    base_rows = tiny_pipe.text_encoder.get_input_embeddings().weight[: len(loaded.tokenizer)]
    assert torch.equal(loaded.text_encoder.get_input_embeddings().weight, base_rows)
    assert sorted(p.name for p in (tmp_path / "sf" / "embeddings").iterdir()) == ["<catb>.safetensors",
                                                                                  "<doga>.safetensors"]


def test_cli_fuse(tmp_path, tiny_model_dir, tiny_pipe, concepts, capsys) -> None:
    paths = [str(save_concept(tmp_path / f"c{i}.safetensors", c)) for i, c in enumerate(concepts)]
    out = tmp_path / "fused"
    base = ["--base", str(tiny_model_dir), "--device", "cpu", "--method", "spectral"]
    assert main(["fuse", *paths, "--out", str(out), "--weights", "1,0.25", *base]) == 0
    assert "fused 2 concepts (<doga> x1, <catb> x0.25) with spectral" in capsys.readouterr().out
    assert json.loads((out / "fusion.json").read_text())["weights"] == [1.0, 0.25]
    assert main(["fuse", *paths, "--out", str(out), *base]) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    overlapping = random_concept(tiny_pipe, band=0, token="<owlc>", seed=4)
    paths.append(str(save_concept(tmp_path / "c2.safetensors", overlapping)))
    assert main(["fuse", *paths, "--out", str(tmp_path / "x"), *base]) == 2
    assert "c0.safetensors (<doga>) (band 0, rank 4) and c2.safetensors (<owlc>)" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["fuse", *paths, "--out", str(tmp_path / "x"), "--allow-overlap", *base]) == 0
    assert "warning: concepts" in capsys.readouterr().err


def test_cli_fuse_defaults_to_closed_form_and_refuses_its_lora_before_loading(tmp_path, tiny_model_dir, tiny_pipe,
                                                                            concepts, capsys) -> None:
    paths = [str(save_concept(tmp_path / f"c{i}.safetensors", c)) for i, c in enumerate(concepts)]
    base = ["--base", str(tiny_model_dir), "--device", "cpu"]
    assert main(["fuse", *paths, "--out", str(tmp_path / "fused"), *base]) == 0
    assert "with closed-form" in capsys.readouterr().out
    assert json.loads((tmp_path / "fused" / "fusion.json").read_text())["method"] == "closed-form"
    assert main(["fuse", *paths, "--out", str(tmp_path / "lora"), "--format", "lora", "--base", "no-such-base"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --format lora needs a method whose result is an exact sum of factors (spectral, sum, mean); "
        "closed-form gives dense weight changes: write diffusers or single-file, or pass --method spectral")
    assert not (tmp_path / "lora").exists()


def test_cli_fuse_refuses_an_unwritable_place_first_and_a_full_disk_in_one_line(
        tmp_path, tiny_model_dir, tiny_pipe, concepts, capsys, monkeypatch) -> None:
    paths = [str(save_concept(tmp_path / f"c{i}.safetensors", c)) for i, c in enumerate(concepts)]
    (tmp_path / "a-file").write_text("x")
    args = ["fuse", *paths, "--base", str(tiny_model_dir), "--method", "spectral"]
    assert main([*args, "--out", str(tmp_path / "a-file" / "fused")]) == 2
    a_file = tmp_path / "a-file"
    assert capsys.readouterr().err.strip().splitlines() == [f"error: cannot write to {a_file}: {a_file} is a file, "
                                                            "not a folder"]

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", full_disk)
    assert main([*args, "--out", str(tmp_path / "fused")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: could not complete: [Errno 28] No space left on device")  # after the loading bars (issue 12)
    assert not (tmp_path / "fused").exists() and not list(tmp_path.glob(".fused*"))
