"""Fusing many concept files into one pipeline's weights: the exact spectral sum, the closed-form text-side merge,
and honest baselines.

`spectral` (`fuse`'s default, exact like diffusers' `fuse_lora`) adds `sum_i w_i dW_i` for Spectral Adapter concepts
in disjoint SVD bands; the factors come from each concept file (`Concept.delta_factors`), never from a recomputed
SVD, and overlapping bands are refused. Disjoint bands keep the weights apart but not the functions, so the CLI and
the app fuse with `closed-form` (`RECOMMENDED_METHOD`), which kept identity best in the fusion benchmark. Every
method refuses another base model and duplicate tokens.

Modules: `methods` (the merge math and the statistics gradient / closed-form fusion solve), `fusing` (the
concept-set checks, `fuse`, `FusionReport`), `writers` (`save_fused`: diffusers, single-file or LoRA output, and
`fusion.json`). Import from the package: `from spectral_diffusion.fusion import fuse, save_fused`.
"""

from spectral_diffusion.fusion.fusing import (
    FUSION_FORMAT_VERSION,
    FusedConcept,
    FusionReport,
    add_tokens,
    check_concepts,
    check_request,
    fuse,
    load_concepts,
    weights_for,
)
from spectral_diffusion.fusion.methods import (
    LOW_RANK_METHODS,
    METHODS,
    ORDINARY_TEMPLATES,
    RECOMMENDED_METHOD,
    RECORD_TEMPLATES,
    GradientStats,
    _GramRecorder,
    concat_factors,
    concept_prompts,
    dare_merge,
    merged_delta,
    ordinary_prompts,
    record_gradient_stats,
    record_prompts,
    record_text_stats,
    ties_merge,
)
from spectral_diffusion.fusion.writers import (
    FUSION_JSON,
    OUTPUT_FORMATS,
    check_format,
    check_output,
    read_fusion_json,
    save_fused,
)

__all__ = [
    "FUSION_FORMAT_VERSION",
    "FUSION_JSON",
    "LOW_RANK_METHODS",
    "METHODS",
    "ORDINARY_TEMPLATES",
    "OUTPUT_FORMATS",
    "RECOMMENDED_METHOD",
    "RECORD_TEMPLATES",
    "FusedConcept",
    "FusionReport",
    "GradientStats",
    "_GramRecorder",
    "add_tokens",
    "check_concepts",
    "check_format",
    "check_output",
    "check_request",
    "concat_factors",
    "concept_prompts",
    "dare_merge",
    "fuse",
    "load_concepts",
    "merged_delta",
    "ordinary_prompts",
    "read_fusion_json",
    "record_gradient_stats",
    "record_prompts",
    "record_text_stats",
    "save_fused",
    "ties_merge",
    "weights_for",
]
