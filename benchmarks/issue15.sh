#!/usr/bin/env bash
# The issue-15 targets: five `vittt bench` runs (one per batch size / peer group; every ratio is between models of
# the same run), then the targets table. About 6–8 min on the project's 2-core machine.
#   bash benchmarks/issue15.sh [OUTPUT_DIR]        (default docs/bench/issue15)
#   OFFICIAL=PATH bash benchmarks/issue15.sh       also time the official ViT³ TTT block (a checkout of
#                                                  LeapLabTHU/ViTTT) in runs 1 and 3 (`vittt bench --official`)
set -euo pipefail
out=${1:-docs/bench/issue15}
vittt=${VITTT:-vittt}
common=(--threads 2 --warmup 1)
official=(${OFFICIAL:+--official "$OFFICIAL"})
# 1. ViT³-T vs DeiT-T at 224²: training step (batch 32) and inference throughput (batch 64)
$vittt bench --models vit3_tiny deit_tiny_patch16_224 --sizes 224 --mode infer train --batch-size 64 \
    --train-batch-size 32 --repeats 5 --memory-repeats 3 "${common[@]}" "${official[@]}" --output "$out/vit3_224"
# 2. ViT³-T vs DeiT-T at 224², batch 1 (latency; time only)
$vittt bench --models vit3_tiny deit_tiny_patch16_224 --sizes 224 --batch-size 1 --repeats 21 --no-memory \
    "${common[@]}" --output "$out/vit3_224_b1"
# 3. H-ViT³-T vs ConvNeXt-T, Swin-T, PVTv2-b2 at 224²: inference and training step, batch 16
$vittt bench --models hvit3_tiny convnext_tiny swin_tiny_patch4_window7_224 pvt_v2_b2 --sizes 224 \
    --mode infer train --batch-size 16 --repeats 5 --no-memory "${common[@]}" "${official[@]}" --output "$out/hvit3_224"
# 4. H-ViT³-T vs ConvNeXt-T and PVTv2-b2 at 1024², batch 1
$vittt bench --models hvit3_tiny convnext_tiny pvt_v2_b2 --sizes 1024 --batch-size 1 --repeats 5 --no-memory \
    "${common[@]}" --output "$out/hvit3_1024"
# 5. no regression at high resolution and Vittt-T at the paper's 1280²: ViT³-T (and lean) / Vittt-T vs DeiT-T
#    (memory: the median of 3 fresh processes per configuration; one reading of DeiT-T's RSS moves by ±20 %)
$vittt bench --models vit3_tiny vision_ttt_tiny deit_tiny_patch16_224 --sizes 1248 1280 --batch-size 1 --lean \
    --repeats 5 --memory-repeats 3 "${common[@]}" --output "$out/highres"
python3 benchmarks/targets.py --issue 15 --plot "$out/targets.png" "$out"/*/bench.json | tee "$out/targets.md"
