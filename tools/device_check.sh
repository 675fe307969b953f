#!/usr/bin/env bash
# The GPU check: one command for a lent GPU machine (no network; .whl/ carried), at most 8 minutes.
#
#   tools/fetch_device_wheels.sh            here, first: .whl/ with what the machine lacks
#   bash tools/device_check.sh              there (python3 with torch+CUDA), carrying .whl
#   bash tools/device_check.sh --dry-run    here, on CPU: what can be checked without a GPU
#
# Parts: a) install the carried wheels, torch/CUDA/GPU; b) the gpu-marked tests (those needing
# Transformer Engine or DALI skip with their reason); c) the tiny LLM's training step in bf16 against
# fp32 (tests/training/test_gpu_bf16.py); d) 1-rank NCCL v2pe-train on the tiny recipe with step times;
# e) SUMMARY, one line per part. The whole log goes to $OUT/device_check.log when $OUT is set.
#
# --bench: a) then e) the training-step benchmark (benchmarks/step.py --gpu: InternVL2-2B shapes,
# local spec, bf16, 8K and 32K tokens, tokens/s, TFLOP/s and MFU), instead of b)-d); one command of
# at most 8 minutes too. With --dry-run it prints that command and checks the script imports.
#
# --memory: a) then f) the memory check (benchmarks/plan_memory.py --gpu: InternVL2-2B shapes, bf16,
# 8K and 32K tokens, each recompute setting the plan says fits: saved-tensor bytes, memory allocated
# after the forward and torch.cuda.max_memory_allocated over forward + backward, against v2pe-plan's
# model), instead of b)-d). With --dry-run it prints that command and runs the same code on the CPU
# with the tiny preset and the GPU image's packages only (--device-memory-cpu).
#
# --dry-run: checks the wheels are there and under the limit, installs them into a temporary
# --target and imports megatron.core and omegaconf from it with the repo, prints every command the
# real run executes, then runs the CPU equivalents with every package the GPU image lacks hidden
# (tools/device_sim): collection of the gpu tests, the bf16/fp32 comparison on CPU, v2pe-train
# --print-recipe with the GPU overrides and a 2-step gloo run of the same recipe.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD

DRY=0
BENCH=0
MEMORY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --bench) BENCH=1 ;;
    --memory) MEMORY=1 ;;
    *) echo "usage: $0 [--dry-run] [--bench | --memory]" >&2; exit 2 ;;
  esac
done
if ((BENCH && MEMORY)); then echo "$0: --bench and --memory are separate runs (8 minutes each)" >&2; exit 2; fi

DEADLINE=470          # seconds; the brief is 8 minutes for the whole command
LOG=$(mktemp /tmp/device_check.XXXXXX.log)
PARTLOG=$(mktemp /tmp/device_check_part.XXXXXX.log)
DRY_SITE=""  # --dry-run's throw-away --target (made here: main runs in a pipeline's subshell)
((DRY)) && DRY_SITE=$(mktemp -d /tmp/v2pe_device_site.XXXXXX)

# The real run's commands, built for a given python and --target folder.
define_cmds() {
  local py=$1 site=$2
  INSTALL=("$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
           --target "$site" .whl/*.whl)
  INFO=("$py" tools/device_info.py)
  GPU_TESTS=("$py" -m pytest -m gpu tests/ --ignore=tests/training/test_gpu_bf16.py -q -rs -p no:cacheprovider -p no:warnings
             --timeout=120)
  BF16_TEST=("$py" -m pytest -m gpu tests/training/test_gpu_bf16.py -q -s -rs -p no:cacheprovider -p no:warnings --timeout=120)
  TRAIN=("$py" -m v2pe_megatron.cli.train recipes/tiny_cpu.yaml launcher.nproc_per_node=1
         launcher.backend=nccl tracking.backend=none train.steps=5 train.log_interval=1 model.dtype=bf16)
  BENCH_CMD=("$py" benchmarks/step.py --gpu --steps 3)
  MEMORY_CMD=("$py" benchmarks/plan_memory.py --gpu --seq 8192 32768)
  MEMORY_DRY_CMD=("$py" benchmarks/plan_memory.py --device-memory-cpu --seq 256 512)
}

memory_numbers() {  # "tokens/recompute: saved x, peak y" (planned/measured) per measured row of the table
  grep -E '^\| [0-9]+ \|' "$PARTLOG" | awk -F'|' '{gsub(/ /, ""); printf "%s/%s saved %s peak %s; ", $2, $4, $8, $12}'
}

memory_part() {  # f) the memory check; planned/measured ratios go to the summary
  header "f) memory: InternVL2-2B shapes, bf16, 8K and 32K tokens, max_memory_allocated vs v2pe-plan"
  local t0=$SECONDS
  if run 420 "${MEMORY_CMD[@]}"; then
    add f "memory" PASS "planned/measured: $(memory_numbers)[$((SECONDS - t0))s]"
  else
    add f "memory" FAIL "$(grep -E 'Error|error' "$PARTLOG" | tail -1) $(memory_numbers)"
  fi
}

bench_part() {  # e) the step benchmark; its result lines go to the summary
  header "e) training-step benchmark: InternVL2-2B shapes, local spec, bf16, 8K and 32K tokens"
  local t0=$SECONDS
  if run 420 "${BENCH_CMD[@]}"; then
    add e "benchmark" PASS "$(grep -E 'tokens/s' "$PARTLOG" | sed -E 's/ +/ /g' | paste -sd';' -) [$((SECONDS - t0))s]"
  else
    add e "benchmark" FAIL "$(grep -E 'Error|error' "$PARTLOG" | tail -1)"
  fi
}

SUMMARY=()
add() { SUMMARY+=("$(printf '%-3s %-12s %-5s %s' "$1" "$2" "$3" "$4")"); }
header() { printf '\n===== %s  [%ds]\n' "$1" "$SECONDS"; }
show() { printf '+'; printf ' %q' "$@"; printf '\n'; }

# run SECONDS CMD...: echo it, run it under a time limit with its output in the log and $PARTLOG
run() {
  local limit=$1; shift
  local left=$((DEADLINE - SECONDS))
  (( limit > left )) && limit=$left
  show "$@"
  if (( limit < 10 )); then echo "(no time left)"; : >"$PARTLOG"; return 124; fi
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$PARTLOG"
  return "${PIPESTATUS[0]}"
}

pytest_counts() { grep -E '^=*.*[0-9]+ (passed|failed|skipped|error|deselected)' "$PARTLOG" | tail -1 | sed -E 's/^=+ //; s/ =+$//'; }
skip_reasons() { sed -nE 's/^SKIPPED \[[0-9]+\] [^:]+:[0-9]+: (.*)$/\1/p' "$PARTLOG" | sort -u | paste -sd'|' - | sed 's/|/; /g'; }

train_numbers() {  # step times and losses out of v2pe-train's log lines
  local times
  times=$(sed -nE 's/.* step [0-9]+\/[0-9]+ .* step ([0-9.]+)s.*/\1/p' "$PARTLOG" | paste -sd' ' -)
  echo "step times ${times:-none} s; $(grep -oE 'loss [0-9.]+ -> [0-9.]+' "$PARTLOG" | tail -1)"
}

real_run() {
  local py=python3 site=/tmp/v2pe_device_site rc
  define_cmds "$py" "$site"
  export PYTHONPATH="$REPO:$site" V2PE_EXPECT_SITE="$site" V2PE_REQUIRE_CUDA=1

  header "a) carried wheels, torch / CUDA / GPU"
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    add a setup FAIL "no .whl/*.whl: run tools/fetch_device_wheels.sh here and carry .whl"
  elif run 60 "${INSTALL[@]}" && run 60 "${INFO[@]}"; then
    add a setup PASS "$(grep '^summary:' "$PARTLOG" | cut -d' ' -f2-)"
  else
    add a setup FAIL "$(grep '^summary:' "$PARTLOG" | cut -d' ' -f2- | grep . || tail -1 "$PARTLOG")"
  fi
  if [[ ${SUMMARY[0]} == *FAIL* ]]; then
    add b "gpu tests" SKIP "setup failed"; add c "bf16 step" SKIP "setup failed"
    add d "v2pe-train" SKIP "setup failed"; return
  fi
  if ((BENCH)); then bench_part; return; fi
  if ((MEMORY)); then memory_part; return; fi

  header "b) gpu-marked tests (without Transformer Engine and DALI)"
  local t0=$SECONDS
  run 150 "${GPU_TESTS[@]}"; rc=$?
  add b "gpu tests" "$( ((rc == 0)) && echo PASS || echo FAIL)" \
    "$(pytest_counts) [$((SECONDS - t0))s]; skips: $(skip_reasons)"

  header "c) tiny LLM training step: bf16 against fp32, same weights and batch"
  t0=$SECONDS
  run 120 "${BF16_TEST[@]}"; rc=$?
  local nums; nums=$(grep -E '^cuda: loss fp32' "$PARTLOG" | sed 's/^cuda: //')
  if ((rc == 0)) && grep -q '1 passed' "$PARTLOG"; then add c "bf16 step" PASS "$nums [$((SECONDS - t0))s]"
  elif ((rc == 0)); then add c "bf16 step" SKIP "$(skip_reasons)"
  else add c "bf16 step" FAIL "${nums:-$(grep -E '^E ' "$PARTLOG" | head -1)} ($(pytest_counts))"; fi

  header "d) v2pe-train recipes/tiny_cpu.yaml: 1 rank, NCCL, bf16, 5 steps"
  t0=$SECONDS
  if run 120 "${TRAIN[@]}"; then
    add d "v2pe-train" PASS "nccl bf16: $(train_numbers) [$((SECONDS - t0))s]"
  else
    local err; err=$(grep -E 'Error|error' "$PARTLOG" | tail -1)
    header "d) again in fp32 (bf16 failed)"
    if run 90 "${TRAIN[@]/model.dtype=bf16/model.dtype=fp32}"; then
      add d "v2pe-train" FAIL "bf16 failed (${err:0:150}); fp32 passed: $(train_numbers)"
    else
      add d "v2pe-train" FAIL "bf16 and fp32 failed: ${err:0:200}"
    fi
  fi
}

dry_run() {
  local py=${PYTHON:-} site rc
  if [[ -z $py ]]; then
    if [[ -x .venv/bin/python ]]; then py=$REPO/.venv/bin/python; else py=python3; fi
  fi
  site=$DRY_SITE

  header "the real run executes (on the GPU machine, from the repo root)"
  define_cmds python3 /tmp/v2pe_device_site
  echo "export PYTHONPATH=\$PWD:/tmp/v2pe_device_site V2PE_EXPECT_SITE=/tmp/v2pe_device_site V2PE_REQUIRE_CUDA=1"
  show "${INSTALL[@]}"; show "${INFO[@]}"
  if ((BENCH)); then show "${BENCH_CMD[@]}"
  elif ((MEMORY)); then show "${MEMORY_CMD[@]}"
  else show "${GPU_TESTS[@]}"; show "${BF16_TEST[@]}"; show "${TRAIN[@]}"; echo "(d again with model.dtype=fp32 if bf16 fails)"
  fi

  define_cmds "$py" "$site"
  # Once the wheels are in, what the GPU image lacks is made unimportable (tools/device_sim).
  local allow
  allow=$(cd .whl 2>/dev/null && ls ./*.whl 2>/dev/null | sed -E 's#^\./##; s/-.*//' | paste -sd' ' -)
  local sim=(env PYTHONPATH="$REPO/tools/device_sim:$REPO:$site"
             V2PE_DEVICE_SIM="$REPO/tools/device_image_packages.txt" V2PE_DEVICE_SIM_ALLOW="$allow")

  header "a) wheels present and under the limit; installed into $site; imports from there"
  if PYTHON=$py run 30 tools/fetch_device_wheels.sh --check && run 120 "${INSTALL[@]}" &&
     run 60 "${sim[@]}" V2PE_EXPECT_SITE="$site" V2PE_REQUIRE_CUDA=0 "${INFO[@]}"; then
    add a setup PASS "$(grep '^summary:' "$PARTLOG" | cut -d' ' -f2-) (dry: this machine's torch)"
  else
    add a setup FAIL "$(tail -1 "$PARTLOG")"
    add b "gpu tests" SKIP "setup failed"; add c "bf16 step" SKIP "setup failed"
    add d "v2pe-train" SKIP "setup failed"; return
  fi

  if ((BENCH)); then
    header "e) dry: the benchmark script imports with the GPU machine's packages only"
    if run 60 "${sim[@]}" "$py" benchmarks/step.py --help >/dev/null; then add e "benchmark" PASS "dry: imports; --gpu needs CUDA"
    else add e "benchmark" FAIL "dry: $(tail -1 "$PARTLOG")"; fi
    return
  fi
  if ((MEMORY)); then
    header "f) dry: the memory check's code on the CPU (tiny preset) with the GPU machine's packages only"
    if run 120 "${sim[@]}" "${MEMORY_DRY_CMD[@]}"; then add f "memory" PASS "dry: planned/measured $(memory_numbers)"
    else add f "memory" FAIL "dry: $(tail -1 "$PARTLOG")"; fi
    return
  fi

  header "b) dry: collect the gpu-marked tests with the GPU machine's packages only"
  run 120 "${sim[@]}" "$py" -m pytest --collect-only -q -m gpu tests/ -p no:cacheprovider -p no:warnings; rc=$?
  add b "gpu tests" "$( ((rc == 0)) && echo PASS || echo FAIL)" "dry: $(pytest_counts)"

  header "c) dry: the bf16/fp32 step comparison on CPU (gloo)"
  if run 120 "${sim[@]}" "$py" tests/training/test_gpu_bf16.py; then
    add c "bf16 step" PASS "dry: $(grep -E '^cpu: loss' "$PARTLOG" | sed 's/^cpu: //')"
  else
    add c "bf16 step" FAIL "dry: $(grep -E 'Error' "$PARTLOG" | tail -1)"
  fi

  header "d) dry: the recipe with the GPU overrides, then 2 steps of it on gloo"
  local args=("${TRAIN[@]:3}")  # the recipe and its overrides
  if run 60 "${sim[@]}" "$py" -m v2pe_megatron.cli.train "${args[@]}" --print-recipe >/dev/null &&
     { echo "resolved recipe, key lines:"; grep -E '^ *(dtype|spec|backend|nproc_per_node|steps):' "$PARTLOG"; } &&
     run 120 "${sim[@]}" "$py" -m v2pe_megatron.cli.train "${args[@]/launcher.backend=nccl/launcher.backend=gloo}" \
       train.steps=2; then
    local tiler; tiler=$(grep -q 'tiling images with Pillow' "$PARTLOG" && echo "Pillow tiling" || echo "DALI tiling")
    add d "v2pe-train" PASS "dry: gloo bf16, $tiler, $(train_numbers)"
  else
    add d "v2pe-train" FAIL "dry: $(grep -E 'Error|error' "$PARTLOG" | tail -1)"
  fi
}

main() {
  echo "device_check $( ((DRY)) && echo '--dry-run ')$( ((BENCH)) && echo '--bench ')$( ((MEMORY)) && echo '--memory ')on $(hostname) at $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  if ((DRY)); then dry_run; else real_run; fi
  header "SUMMARY$( ((DRY)) && echo ' (dry run: CPU equivalents)')"
  printf '%s\n' "${SUMMARY[@]}"
  echo "total ${SECONDS}s"
  for s in "${SUMMARY[@]}"; do [[ $s == *" FAIL "* ]] && return 1; done
  return 0
}

main 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
if [[ -n ${OUT:-} ]]; then mkdir -p "$OUT" && cp "$LOG" "$OUT/device_check.log" && chmod a+r "$OUT/device_check.log"; fi
rm -f "$LOG" "$PARTLOG"
[[ -n $DRY_SITE ]] && rm -rf "$DRY_SITE"
exit "$status"
