#!/usr/bin/env bash
# `spectral-diffusion demo`, done with the separate CLI commands a user would type: train three bundled toy-world
# concepts with the toy recipe (each in the next free SVD band: --band auto), fuse them with the recipe's method,
# generate each concept on a background its photos never had, and all three side by side with regional prompts.
#
#   pipelines/toy_three_concepts.sh [OUT]          (default OUT: toy-three-concepts; env BASE=toy)
#
# Re-running skips concepts already trained in OUT. Runs from any directory; needs the repo's concepts/toyworld/.
set -euo pipefail

OUT=${1:-toy-three-concepts}
BASE=${BASE:-toy}
SD=${SD:-spectral-diffusion}
# The toy recipe (spectral_diffusion/toyworld/recipe.py) as train flags, its fuse flags, and the ordinary captions
# that closed-form fusion keeps mapped as the base does.
read -r -a RECIPE <<<"$("$SD" toyworld recipe)"
read -r -a FUSION <<<"$("$SD" toyworld recipe --fusion)"
PHOTOS="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/concepts/toyworld"
CONCEPTS=("striped_fish fish" "red_door_house house" "bullseye circle")
mkdir -p "$OUT"
"$SD" toyworld captions > "$OUT/captions.txt"

for entry in "${CONCEPTS[@]}"; do
  read -r name class <<<"$entry"
  if [[ ! -f "$OUT/$name.safetensors" ]]; then
    # --concepts-dir: --band auto also avoids the bands of the concept files already in OUT.
    "$SD" train "$PHOTOS/$name" --token "<$name>" --class-word "$class" --out "$OUT/$name.safetensors" \
      --base "$BASE" --band auto "${RECIPE[@]}" --checkpoint-every 0 --preview-images 0 --concepts-dir "$OUT"
  fi
done

"$SD" fuse "$OUT/striped_fish.safetensors" "$OUT/red_door_house.safetensors" "$OUT/bullseye.safetensors" \
  --base "$BASE" "${FUSION[@]}" --prior-prompts "$OUT/captions.txt" --out "$OUT/fused" --overwrite

for entry in "${CONCEPTS[@]}"; do
  read -r name class <<<"$entry"
  "$SD" generate --model "$OUT/fused" --prompt "a photo of <$name> $class on a dotted background" \
    --n 4 --seed 1000 --guidance 5 --out "$OUT/images"
done

# Three regions on a 192x64 canvas: a third of the width per concept, each denoised in its own native-size window
# (latent mode: the toy base never drew two objects in one image), with the concepts live rather than fused, each
# applied only in the region that names its token (fused models keep only part of each identity side by side:
# docs/results/fusion_quality.md).
"$SD" generate --base "$BASE" --concepts "$OUT/striped_fish.safetensors" "$OUT/red_door_house.safetensors" \
  "$OUT/bullseye.safetensors" --size 192x64 --n 4 --seed 1000 --guidance 5 --out "$OUT/images" --region-mode latent \
  --prompt "a photo of <striped_fish> fish and <red_door_house> house and <bullseye> circle on a gray background" \
  --region "a photo of <striped_fish> fish on a gray background:0,0,0.333,1" \
  --region "a photo of <red_door_house> house on a gray background:0.333,0,0.667,1" \
  --region "a photo of <bullseye> circle on a gray background:0.667,0,1,1"
echo "images in $OUT/images"
