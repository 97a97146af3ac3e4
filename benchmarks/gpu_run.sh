#!/usr/bin/env bash
# The GPU sessions behind benchmarks/results/: speed of the pieces and pipelines, the GPU tests, full-size exports.
# Usage (on an H100/H200 machine with torch/onnx/onnxruntime; wheels for diffusers carried in .whl/):
#   bash benchmarks/gpu_run.sh OUT_DIR
# Knobs (environment):
#   SKIP_SPEED=1        no benchmarks/speed.py;  SPEED_ARGS="..." its flags (default: 5 fast / 1 eager end-to-end runs)
#   SPEED_TIMEOUT=s     its time limit (default 240)
#   GPU_TESTS=1         also run the GPU-marked tests (pytest -m gpu), GPU_TESTS_TIMEOUT=s (default 240);
#                       GPU_TESTS_FILES="tests/..." limits them (the AOTInductor test alone can take minutes);
#                       GPU_TESTS_ALL=1 runs every test of those files, not only the gpu-marked ones (the kernel
#                       tests run on the GPU wherever one is present);
#                       the fixtures must travel: copy ../shared/fixtures into .fixtures/ and set MINGRT_FIXTURES
#   DETERMINISM_ARGS="--replays 3 --cases 0,1,5"   also run benchmarks/determinism_check.py with these flags
#   MOE_GROUPED=1       first run benchmarks/moe_grouped.py (per-slot against grouped MoE kernels), MOE_GROUPED_ARGS its flags
#   ATTENTION_CHECK=1   first run benchmarks/attention_check.py (decode attention: repeatability and time per call)
#   PROFILE=1           also run benchmarks/profile_step.py (every kernel of the FP8 token step, by part);
#                       PROFILE_ARGS="--prompts 8" its flags
#   FLOW_CHAIN=1        first run benchmarks/flow_chain_check.py (the experimental one-launch Euler step);
#                       FLOW_CHAIN_ARGS="--sweep --formats fp8" its flags
#   FLOW_ABLATION=1     first run benchmarks/flow_ablation.py --formats fp8,bf16 (each launch kind's cost in the head)
#   FLOW_SWEEP_ARGS="--formats fp8 --only w3 --install"   first run benchmarks/flow_sweep.py with these flags
#                       (configs timed inside the head's graph); FLOW_SWEEP_INSTALL=1 then copies its table into
#                       kernels/configs/ for the runs below
#   TOKENIZER=1         first run benchmarks/tokenizer_modes.py --modes graph,compile, tokenizer_layers.py (one
#                       MingTok layer op by op) and attention_backends.py
#   KERNELS_ARGS="..."  first run benchmarks/kernels.py with these flags ("" is unset; use "--reps 30" for a sweep);
#                       KERNELS_INSTALL=1 then copies the swept table into kernels/configs/ for the runs below
#   SKIP_EXPORTS=1      no full-size exports; FP8_PIECES / BF16_PIECES / FP8_TIMEOUT / BF16_TIMEOUT choose them
#   STEP_BATCHES_ARGS="--formats fp8 --batches 1,8"   also run benchmarks/step_batches.py (batch ratio in one process)
#   AOTI_TRACE=1        first run benchmarks/aoti_crash_trace.py for a CPU and a CUDA package (native frames of
#                       AOTInductor's loader crash, where it crashes; ~60 s)
#   AOTI_LINK=1         first run benchmarks/aoti_link_check.py --devices cuda (a package linked the torch way against
#                       one linked to the loaded libstdc++.so.6; ~2 min)
#   MOE_TILES_ARGS="--rows 2,16 --variants num_warps=2"   also run benchmarks/moe_tiles_ab.py with these flags
#   COMPILED_STEPS_ARGS="--formats fp8"   also run benchmarks/compiled_steps.py (full-size AOTInductor packages:
#                       build, verify, load, token step against torch.compile's); COMPILED_STEPS_TIMEOUT (default 480)
#   AOTI_PDL=1          first run benchmarks/aoti_pdl_check.py (a small step's package with and without Inductor's PDL
#                       switch: builds, loads, matches eager, replays in a CUDA graph; ~2 min)
#   AOTI_ACCURACY_ARGS="--packages DIR"   also run benchmarks/aoti_accuracy.py with these flags (op-by-op record of
#                       eager, nudged eager, package and torch.compile; without --packages it builds them first)
#   TAR=1               at the end, pack OUT_DIR into OUT_DIR.tgz (the device tool returns at most 8 files)
set -u
OUT=${1:?output folder}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
mkdir -p "$OUT"
if [ "${AOTI_TRACE:-0}" = 1 ]; then
  for how in cpu cuda; do
    flag=""; [ "$how" = cuda ] && flag="--cuda"
    timeout 300 python3 benchmarks/aoti_crash_trace.py "$OUT/aoti_trace_$how" $flag > /dev/null 2>&1
    grep -E "^(build|load) |^#[0-9]+ " "$OUT/aoti_trace_$how/aoti_crash_trace.log" | head -30
  done
fi
if [ "${AOTI_LINK:-0}" = 1 ]; then
  timeout 300 python3 benchmarks/aoti_link_check.py "$OUT/aoti_link" --devices cuda > "$OUT/aoti_link_check.log" 2>&1
  cut -c1-400 "$OUT/aoti_link_check.log"
fi
if [ "${AOTI_PDL:-0}" = 1 ]; then
  timeout 540 python3 benchmarks/aoti_pdl_check.py --out "$OUT" --timeout 240 > "$OUT/aoti_pdl_check.log" 2>&1
  grep -E "^enable_pdl" "$OUT/aoti_pdl_check.log"
fi
if [ -n "${KERNELS_ARGS:-}" ]; then
  timeout "${KERNELS_TIMEOUT:-240}" python3 benchmarks/kernels.py --out "$OUT" $KERNELS_ARGS > "$OUT/kernels.log" 2>&1
  tail -3 "$OUT/kernels.log"
  if [ "${KERNELS_INSTALL:-0}" = 1 ]; then  # the runs below use the table just swept
    for f in "$OUT"/NVIDIA_*.json; do [ -e "$f" ] && cp "$f" kernels/configs/ && echo "installed $f"; done
  fi
fi
if [ "${FLOW_CHAIN:-0}" = 1 ]; then
  case "${FLOW_CHAIN_ARGS:-}" in *--sweep*) chain_limit=360 ;; *) chain_limit=150 ;; esac
  timeout "${FLOW_CHAIN_TIMEOUT:-$chain_limit}" python3 benchmarks/flow_chain_check.py --out "$OUT" ${FLOW_CHAIN_ARGS:-} \
      > "$OUT/flow_chain_check.log" 2>&1
  tail -12 "$OUT/flow_chain_check.log"
fi
if [ -n "${FLOW_SWEEP_ARGS:-}" ]; then
  timeout "${FLOW_SWEEP_TIMEOUT:-300}" python3 benchmarks/flow_sweep.py --out "$OUT" $FLOW_SWEEP_ARGS > "$OUT/flow_sweep.log" 2>&1
  grep -E "merge|tabled|best" "$OUT/flow_sweep.log" | tail -8
  if [ "${FLOW_SWEEP_INSTALL:-0}" = 1 ]; then
    for f in "$OUT"/NVIDIA_*.json; do [ -e "$f" ] && cp "$f" kernels/configs/ && echo "installed $f"; done
  fi
fi
if [ "${FLOW_ABLATION:-0}" = 1 ]; then
  timeout 150 python3 benchmarks/flow_ablation.py --out "$OUT" --formats fp8,bf16 > "$OUT/flow_ablation.log" 2>&1
  grep -v Warn "$OUT/flow_ablation.log" | tail -12
fi
if [ "${TOKENIZER:-0}" = 1 ]; then
  timeout 150 python3 benchmarks/tokenizer_modes.py --out "$OUT" --modes graph,compile > "$OUT/tokenizer_modes.log" 2>&1
  grep -E "^(encoder|pixel)" "$OUT/tokenizer_modes.log"
  timeout 120 python3 benchmarks/tokenizer_layers.py --out "$OUT" > "$OUT/tokenizer_layers.log" 2>&1
  grep -E "^(encoder|pixel) " "$OUT/tokenizer_layers.log"
  timeout 60 python3 benchmarks/attention_backends.py --out "$OUT" > "$OUT/attention_backends.log" 2>&1
  tail -6 "$OUT/attention_backends.log"
fi
if [ "${MOE_GROUPED:-0}" = 1 ]; then
  timeout "${MOE_GROUPED_TIMEOUT:-200}" python3 benchmarks/moe_grouped.py --out "$OUT" ${MOE_GROUPED_ARGS:-} > "$OUT/moe_grouped.log" 2>&1
  grep -v Warn "$OUT/moe_grouped.log" | tail -18
fi
if [ "${ATTENTION_CHECK:-0}" = 1 ]; then
  timeout 90 python3 benchmarks/attention_check.py --out "$OUT" > "$OUT/attention_check.log" 2>&1
  tail -3 "$OUT/attention_check.log"
fi
if [ "${SKIP_SPEED:-0}" != 1 ]; then
  timeout "${SPEED_TIMEOUT:-240}" python3 benchmarks/speed.py --out "$OUT" ${SPEED_ARGS:---e2e-runs 5 --eager-e2e-runs 1} 2>&1 \
      | tee "$OUT/speed.log" | grep -v Warn
fi
if [ "${GPU_TESTS:-0}" = 1 ]; then
  marks="-m gpu"; [ "${GPU_TESTS_ALL:-0}" = 1 ] && marks=""
  timeout "${GPU_TESTS_TIMEOUT:-240}" python3 -m pytest -v $marks -rs --durations=0 ${GPU_TESTS_FILES:-tests} > "$OUT/gpu_tests.log" 2>&1
  grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -3
fi
if [ -n "${DETERMINISM_ARGS:-}" ]; then
  timeout "${DETERMINISM_TIMEOUT:-240}" python3 benchmarks/determinism_check.py --out "$OUT" $DETERMINISM_ARGS > "$OUT/determinism.log" 2>&1
  tail -4 "$OUT/determinism.log"
fi
if [ -n "${STEP_BATCHES_ARGS:-}" ]; then
  timeout "${STEP_BATCHES_TIMEOUT:-240}" python3 benchmarks/step_batches.py --out "$OUT" $STEP_BATCHES_ARGS > "$OUT/step_batches.log" 2>&1
  grep -E "batch" "$OUT/step_batches.log" | grep -v Warn | tail -6
fi
if [ -n "${MOE_TILES_ARGS:-}" ]; then
  timeout "${MOE_TILES_TIMEOUT:-240}" python3 benchmarks/moe_tiles_ab.py --out "$OUT" $MOE_TILES_ARGS > "$OUT/moe_tiles_ab.log" 2>&1
  grep -E "rows" "$OUT/moe_tiles_ab.log" | tail -16
fi
if [ -n "${COMPILED_STEPS_ARGS:-}" ]; then
  timeout "${COMPILED_STEPS_TIMEOUT:-480}" python3 benchmarks/compiled_steps.py --out "$OUT" $COMPILED_STEPS_ARGS \
      > "$OUT/compiled_steps.log" 2>&1
  grep -E "^(bf16|fp8):|wrote" "$OUT/compiled_steps.log" | tail -8
fi
if [ -n "${AOTI_ACCURACY_ARGS:-}" ]; then
  timeout "${AOTI_ACCURACY_TIMEOUT:-500}" python3 benchmarks/aoti_accuracy.py --out "$OUT" $AOTI_ACCURACY_ARGS \
      > "$OUT/aoti_accuracy.log" 2>&1
  grep -E "^  |wrote" "$OUT/aoti_accuracy.log" | tail -24
fi
if [ "${PROFILE:-0}" = 1 ]; then
  timeout "${PROFILE_TIMEOUT:-150}" python3 benchmarks/profile_step.py --out "$OUT" ${PROFILE_ARGS:-} > "$OUT/profile_step.log" 2>&1
  tail -3 "$OUT/profile_step.log"
fi
pack() { [ "${TAR:-0}" = 1 ] && tar czf "${OUT%/}.tgz" -C "$OUT" . && echo "packed ${OUT%/}.tgz"; return 0; }
if [ "${SKIP_EXPORTS:-0}" = 1 ]; then pack; exit 0; fi
df -h /tmp | tail -1
# Full-size exports (random weights, released shapes). The LLM goes last: it is 34 GB of bf16.
# FP8_PIECES=llm_step builds the LLM alone (FP8 around a bf16 graph, --quant-base auto)
for spec in "fp8 ${FP8_PIECES:-encoder,semantic_decoder,pixel_decoder,flow_head} ${FP8_TIMEOUT:-260}" "bf16 ${BF16_PIECES:-encoder,semantic_decoder,pixel_decoder,flow_head,llm_step} ${BF16_TIMEOUT:-320}"; do
  set -- $spec
  [ "$2" = none ] && continue
  rm -rf /tmp/full-art
  /usr/bin/time -v timeout "$3" python3 -m export.build --model full --device cuda --precision "$1" --pieces "$2" \
      --out /tmp/full-art --t2i-check off --calib-images 1 --threads 16 > "$OUT/export_full_$1.log" 2>&1
  tail -14 "$OUT/export_full_$1.log" | grep -v "^\s*W1123"
  cp /tmp/full-art/manifest.json "$OUT/export_full_$1_manifest.json" 2>/dev/null
  ls -la /tmp/full-art > "$OUT/export_full_$1_files.txt" 2>/dev/null
done
pack
