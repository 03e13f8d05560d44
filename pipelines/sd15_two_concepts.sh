#!/usr/bin/env bash
# The toy recipe (pipelines/toy_three_concepts.sh) on a real Stable Diffusion 1.x base, for a GPU machine: train two
# concepts from photo folders in their own SVD bands, fuse them exactly, generate each alone in a new scene and
# both side by side with regional prompts. Not run here or in CI: it needs the base weights and a GPU (fp16).
#
#   pipelines/sd15_two_concepts.sh BASE PHOTOS_A TOKEN_A CLASS_A PHOTOS_B TOKEN_B CLASS_B [OUT]
#
# BASE: a hub id (runwayml/stable-diffusion-v1-5), a diffusers folder or a single .safetensors file (Chilloutmix).
# Example: pipelines/sd15_two_concepts.sh chilloutmix.safetensors photos/anna "<annaA>" woman \
#            photos/rex "<rexA>" dog sd15-out
# Tuning: STEPS (1000), RANK (8), PRIOR_DIR (class images for prior preservation, default none).
set -euo pipefail

if [[ $# -lt 7 ]]; then
  sed -n '2,13p' "$0"
  exit 2
fi
BASE=$1 PHOTOS_A=$2 TOKEN_A=$3 CLASS_A=$4 PHOTOS_B=$5 TOKEN_B=$6 CLASS_B=$7
OUT=${8:-sd15-two-concepts}
STEPS=${STEPS:-1000}
RANK=${RANK:-8}
SD=${SD:-spectral-diffusion}
PRIOR=()
[[ -n "${PRIOR_DIR:-}" ]] && PRIOR=(--prior-dir "$PRIOR_DIR")
mkdir -p "$OUT"

train() {  # photos token class file
  [[ -f "$OUT/$4" ]] && return
  "$SD" train "$1" --token "$2" --class-word "$3" --out "$OUT/$4" --base "$BASE" --variant additive \
    --band auto --rank "$RANK" --targets attn --steps "$STEPS" --batch-size 2 --resolution 512 \
    --mixed-precision fp16 --concepts-dir "$OUT" --validation-prompt "a photo of $2 $3 in a garden" \
    "${PRIOR[@]}"
}
train "$PHOTOS_A" "$TOKEN_A" "$CLASS_A" a.safetensors
train "$PHOTOS_B" "$TOKEN_B" "$CLASS_B" b.safetensors

"$SD" fuse "$OUT/a.safetensors" "$OUT/b.safetensors" --base "$BASE" --method spectral --out "$OUT/fused" --overwrite

NEG="lowres, bad anatomy, worst quality"
"$SD" generate --model "$OUT/fused" --prompt "a photo of $TOKEN_A $CLASS_A on a beach at sunset" --negative "$NEG" \
  --n 4 --steps 30 --out "$OUT/images"
"$SD" generate --model "$OUT/fused" --prompt "a photo of $TOKEN_B $CLASS_B in the snow" --negative "$NEG" \
  --n 4 --steps 30 --out "$OUT/images"
"$SD" generate --model "$OUT/fused" --size 1024x512 --n 4 --steps 30 --negative "$NEG" --feather 0.05 \
  --out "$OUT/images" --prompt "a photo of $TOKEN_A $CLASS_A and $TOKEN_B $CLASS_B in a park" \
  --region "a photo of $TOKEN_A $CLASS_A in a park:0,0,0.5,1" \
  --region "a photo of $TOKEN_B $CLASS_B in a park:0.5,0,1,1"
echo "images in $OUT/images"
