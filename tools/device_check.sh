#!/usr/bin/env bash
# The GPU check: one command for a lent GPU machine (one H100 or H200, no network, no Transformer
# Engine, no DALI; .whl/ carried), at most 8 minutes, that runs what users run, in bf16 on CUDA,
# one rank (NCCL), and ends with a SUMMARY of one PASS/FAIL line per part.
#
#   tools/fetch_device_wheels.sh            here, first: .whl/ with what the machine lacks
#   bash tools/device_check.sh --dry-run    here, on the CPU: every part's CPU equivalent (CI runs it)
#   bash tools/device_check.sh              there (python3 with torch + CUDA), carrying .whl
#   bash tools/device_check.sh --memory     there, a separate run: benchmarks/plan_memory.py --gpu
#
# Parts (docs/device_check.md says what each proves and why its tolerance is what it is):
#  a) install the carried wheels; torch, CUDA, the GPU, megatron-core/omegaconf from the wheels.
#  1) v2pe-train of the tiny InternVL (recipes/tiny_cpu.yaml), bf16, distributed optimizer, chunked
#     loss, checkpoint.dir, 8 steps: two uninterrupted runs and a run stopped after 4 steps
#     (train.exit_after_steps) at once, then the same command again resumes it to step 8; per-step
#     losses against the uninterrupted run within RESUME_TOL (the second uninterrupted run shows
#     the run-to-run noise; bf16 on CUDA is not bit-exact between processes).
#  2) v2pe-convert import-hf (local spec) of a tiny transformers InternVL with --verify: the checkpoint
#     loaded again, logits against transformers' own forward in fp32 (its tolerance: 1e-4 relative).
#  3) a NaN loss and an inf gradient under bf16 + the distributed optimizer leave the weights, fp32 main
#     weights and Adam moments bit-identical (tests/training/test_gpu_nonfinite.py), with every other
#     gpu-marked test in the same pytest run (3+: bf16 against fp32 step, rotary, ...).
#  4) v2pe-data synth --needles, then v2pe-eval of them, teacher-forced, on part 1's checkpoint.
#  5) host syncs per training step, counted by torch.cuda.set_sync_debug_mode over the loop's steps
#     after a warm-up, by phase and call site (tests/training/test_gpu_syncs.py, in part 3's run):
#     none in the forward/backward; the rest reported.
#  6) benchmarks/step.py --gpu: InternVL2-2B, local spec, 8K and 16K tokens, the recompute v2pe-plan
#     picks for one 78 GiB GPU; MFU and torch.cuda.max_memory_allocated against the plan.
#  7) what one GPU cannot cover.
# The whole log goes to $OUT/device_check.log when $OUT is set.
#
# --dry-run: checks the wheels are there and under the limit, installs them into a temporary
# --target, prints every command of the real run, then runs each part's CPU equivalent (gloo, bf16
# where the CPU has it) with every package the GPU image lacks hidden (tools/device_sim): the same
# commands and the same parsing of their output, on the CPU.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD

DRY=0
MEMORY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --memory) MEMORY=1 ;;
    --bench) echo "$0: --bench is part 6 of the main run now (benchmarks/step.py --gpu)" >&2; exit 2 ;;
    *) echo "usage: $0 [--dry-run] [--memory]" >&2; exit 2 ;;
  esac
done

DEADLINE=470   # seconds for the whole command (the brief: 8 minutes, ~10 s kept for the copy-back)
# Time limits of the real run's parts, in seconds; they add up to DEADLINE. Python starts cost
# 15-30 s each on the lent machine, so each limit is starts + work with room. Every command is also
# cut at what is left of DEADLINE, so a slow part cannot push the run past 8 minutes.
T_SETUP=50     # a) pip install of the wheels (~5 s; at most 20), device_info.py (one start, CUDA init)
T_TRAIN=120    # 1) three runs at once (T_TRAIN_FIRST), then the resume (the rest)
T_TRAIN_FIRST=70
T_CONVERT=55   # 2) import-hf --verify (one start + transformers); a TF32 diagnosis only if time is left
T_TESTS=80     # 3, 3+, 5) one pytest start, the gpu-marked tests (~30 s of work)
T_EVAL=50      # 4) one v2pe-eval start, 8 samples x 2 deltas (the needles are written during part 1)
T_BENCH=115    # 6) one start, two InternVL2-2B builds, 4 steps each
T_PREP=120     # in the background during part 1: the HF fixture and the needles (own processes)
RESUME_TOL_CUDA=2e-3   # docs/device_check.md: noise << 2e-3 << what a broken resume does (>= 1e-2)
RESUME_TOL_CPU=1e-5    # the CPU is deterministic: equal at the log's 5 decimals
BENCH_OVER=1.10        # 6) FAIL when max_memory_allocated > 1.10 x the plan (its fragmentation headroom)

LOG=$(mktemp /tmp/device_check.XXXXXX.log)
PARTLOG=$(mktemp /tmp/device_check_part.XXXXXX.log)
W=$(mktemp -d /tmp/v2pe_device_check.XXXXXX)   # the parts' checkpoints, data and logs
DRY_SITE=""  # --dry-run's throw-away --target (made here: main runs in a pipeline's subshell)
((DRY)) && DRY_SITE=$(mktemp -d /tmp/v2pe_device_site.XXXXXX)
export PYTHONUNBUFFERED=1

# The commands, for a given python, --target folder, process-group backend and work folder.
define_cmds() {
  local py=$1 site=$2 backend=$3 w=$4
  INSTALL=("$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
           --target "$site" .whl/*.whl)
  INFO=("$py" tools/device_info.py)
  TRAIN=("$py" -m v2pe_megatron.cli.train recipes/tiny_cpu.yaml launcher.nproc_per_node=1
         "launcher.backend=$backend" tracking.backend=none model.dtype=bf16 parallel.use_distributed_optimizer=true
         model.loss_chunk_tokens=64 train.steps=8 train.log_interval=1)
  TRAIN_FULL=("${TRAIN[@]}" "checkpoint.dir=$w/ckpt_full")
  TRAIN_FULL2=("${TRAIN[@]}" "checkpoint.dir=$w/ckpt_full2")
  TRAIN_HALF=("${TRAIN[@]}" "checkpoint.dir=$w/ckpt" train.exit_after_steps=4)   # twice: stop at 4, resume to 8
  FIXTURE=("$py" tools/device_parts.py hf-fixture "$w/hf")
  CONVERT=("$py" -m v2pe_megatron.cli.convert import-hf --hf "$w/hf" --out "$w/hf_ckpt" --spec local --verify
           --no-progress)
  SYNTH=("$py" -m v2pe_megatron.cli.data synth "$w/needles" --needles --lengths 256 512 --depths 0 1
         --tasks retrieval-text retrieval-image --image-tokens 4)   # 4: the tiny preset's tokens per tile
  EVAL=("$py" -m v2pe_megatron.cli.eval recipes/tiny_cpu.yaml tracking.backend=none model.dtype=bf16
        "launcher.backend=$backend" launcher.nproc_per_node=1 --data "$w/needles"
        --mode teacher-forced --delta 1 auto --lengths 1024 --depths 0 1 --out "$w/eval")
  mapfile -t GPU_TEST_FILES < <(grep -rlE 'pytest\.mark\.gpu' tests --include='test_*.py' | sort)
  GPU_TESTS=("$py" -m pytest -m gpu "${GPU_TEST_FILES[@]}" -q -s -rfEsp -p no:cacheprovider -p no:warnings
             --timeout=60)
  BENCH_CMD=("$py" benchmarks/step.py --gpu --steps 3)
  BENCH_DRY_CMD=("$py" benchmarks/step.py --preset tiny --seq-length 256 512 --plan-gib 78 --no-hf --steps 1
                 model.dtype=bf16 model.spec=local)
  MEMORY_CMD=("$py" benchmarks/plan_memory.py --gpu --seq 8192 32768)
  MEMORY_DRY_CMD=("$py" benchmarks/plan_memory.py --device-memory-cpu --seq 256 512)
}

SUMMARY=()
add() { SUMMARY+=("$(printf '%-3s %-13s %-5s %s' "$1" "$2" "$3" "$4")"); }
header() { printf '\n===== %s  [%ds]\n' "$1" "$SECONDS"; }
show() { printf '+'; printf ' %q' "$@"; printf '\n'; }
verdict() { (( $1 == 0 )) && echo PASS || echo FAIL; }
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# limit LIMIT: LIMIT, or less when DEADLINE is nearer
limit() { local left=$((DEADLINE - SECONDS)); (( $1 < left )) && echo "$1" || echo "$left"; }

# run SECONDS CMD...: echo it, run it under a time limit with its output in the log and $PARTLOG
run() {
  local lim; lim=$(limit "$1"); shift
  show "$@"
  if (( lim < 10 )); then echo "(no time left)"; : >"$PARTLOG"; return 124; fi
  timeout -k 10 "$lim" "$@" 2>&1 | tee "$PARTLOG"
  return "${PIPESTATUS[0]}"
}

# start_bg NAME SECONDS CMD...: run it in the background, output in $W/NAME.log; wait_bg NAME shows it
declare -A BG=()
start_bg() {
  local name=$1 lim; lim=$(limit "$2"); shift 2
  printf '+ (background, %s s, output in %s)' "$lim" "$W/$name.log"; printf ' %q' "$@"; printf '\n'
  if (( lim < 10 )); then
    { echo "(no time left)"; exit 124; } >"$W/$name.log" &
  else
    timeout -k 10 "$lim" "$@" >"$W/$name.log" 2>&1 &
  fi
  BG[$name]=$!
}
wait_bg() {
  local rc
  wait "${BG[$1]}"; rc=$?
  printf -- '----- %s (exit %s):\n' "$1" "$rc"; cat "$W/$1.log"; cp "$W/$1.log" "$PARTLOG"
  return "$rc"
}

pytest_counts() { grep -E '^=*.*[0-9]+ (passed|failed|skipped|error|deselected)' "$PARTLOG" | tail -1 | sed -E 's/^=+ //; s/ =+$//'; }
skip_reasons() { sed -nE 's/^SKIPPED \[[0-9]+\] [^:]+:[0-9]+: (.*)$/\1/p' "$PARTLOG" | sort -u | paste -sd'|' - | sed 's/|/; /g'; }
# test_status FILE: the short-summary word of FILE's test(s) in $PARTLOG
test_status() {
  if grep -qE "^(FAILED|ERROR) [^ ]*$1" "$PARTLOG"; then echo FAIL
  elif grep -qE "^PASSED [^ ]*$1" "$PARTLOG"; then echo PASS
  elif grep -qE "^SKIPPED \[[0-9]+\] $1" "$PARTLOG"; then echo SKIP
  else echo FAIL; fi
}
first() { grep -m1 -E "^$1" "$PARTLOG" | sed -E "s/^$1 *//"; }   # the rest of the first line starting PREFIX
# the call sites with the most host syncs per step, out of testing.step_syncs.format_report's lines
sync_sites() {
  sed -nE 's/^  (.{22}) +([0-9.e+-]+) per step  (.*)$/\2 \3/p' "$PARTLOG" | sort -s -k1,1gr | head -4 |
    sed -E 's/^([^ ]+) (.*)$/\1 x \2/' | paste -sd'|' - | sed 's/|/; /g'
}
last_error() {  # the last error line of $PARTLOG, else its last line
  local e; e=$(grep -E 'Error|error|PROBLEM|Traceback' "$PARTLOG" | grep -v -i warn | tail -1)
  echo "${e:-$(grep . "$PARTLOG" | tail -1)}" | cut -c1-240
}

# ---- the parts; $PY is the python, $SIM the environment prefix (empty on the GPU machine) ----------

setup_part() {  # a); fails (and the parts after it are skipped) only when the wheels do not install
  header "a) carried wheels, torch / CUDA / GPU"
  local t0=$SECONDS installed=0 ok=0
  if ((DRY)); then
    PYTHON=$PY run 30 tools/fetch_device_wheels.sh --check && run 120 "${INSTALL[@]}" && installed=1 &&
      run 60 "${SIM[@]}" V2PE_EXPECT_SITE="$SITE" V2PE_REQUIRE_CUDA=0 "${INFO[@]}" && ok=1
  elif ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no .whl/*.whl: run tools/fetch_device_wheels.sh here and carry .whl" | tee "$PARTLOG"
  else
    run 20 "${INSTALL[@]}" && installed=1 && run "$((T_SETUP - (SECONDS - t0)))" "${INFO[@]}" && ok=1
  fi
  local info; info=$(first 'summary:')
  if ((ok)); then add a setup PASS "$info$( ((DRY)) && echo ' (dry: this machine'"'"'s torch)') [$((SECONDS - t0))s]"
  else add a setup FAIL "${info:-$(tail -1 "$PARTLOG")} [$((SECONDS - t0))s]"; fi
  ((installed))
}

start_prep() {  # the inputs of parts 2 and 4, written while part 1 trains
  header "background: the HF fixture (part 2) and the needles (part 4)"
  start_bg fixture "$T_PREP" "${SIM[@]}" "${FIXTURE[@]}"
  start_bg synth "$T_PREP" "${SIM[@]}" "${SYNTH[@]}"
}

train_part() {  # 1)
  header "1) v2pe-train tiny InternVL, $BACKEND, bf16, distributed optimizer, chunked loss: stop after 4, resume, against uninterrupted"
  local t0=$SECONDS rc=0 tol=$RESUME_TOL_CUDA
  ((DRY)) && tol=$RESUME_TOL_CPU
  start_bg full "$T_TRAIN_FIRST" "${SIM[@]}" env MASTER_PORT="$(free_port)" "${TRAIN_FULL[@]}"
  start_bg full2 "$T_TRAIN_FIRST" "${SIM[@]}" env MASTER_PORT="$(free_port)" "${TRAIN_FULL2[@]}"
  start_bg half1 "$T_TRAIN_FIRST" "${SIM[@]}" env MASTER_PORT="$(free_port)" "${TRAIN_HALF[@]}"
  for j in full full2 half1; do wait_bg "$j" || rc=1; done
  if ((rc == 0)); then
    header "1) the same command again: resumes from step 4"
    run "$((T_TRAIN - (SECONDS - t0)))" "${SIM[@]}" env MASTER_PORT="$(free_port)" "${TRAIN_HALF[@]}" || rc=1
    cp "$PARTLOG" "$W/half2.log"
  fi
  if ((rc == 0)) && run 10 "$PY" tools/device_parts.py losses --tol "$tol" "$W/full.log" "$W/full2.log" \
       "$W/half1.log" "$W/half2.log"; then
    local tiler; tiler=$(grep -q 'tiling images with Pillow' "$W/full.log" && echo "Pillow tiling" || echo "DALI tiling")
    add 1 "train+resume" PASS "$BACKEND bf16 distopt loss-chunks 64, $tiler: $(first 'resume:') [$((SECONDS - t0))s]"
  else
    add 1 "train+resume" FAIL "$(first 'resume:') $(last_error) [$((SECONDS - t0))s]"
  fi
}

convert_part() {  # 2)
  header "2) v2pe-convert import-hf (local spec) of a tiny transformers InternVL, --verify: logits against transformers in fp32"
  local t0=$SECONDS rc
  if ! wait_bg fixture; then add 2 "import-hf" FAIL "the fixture was not written: $(last_error)"; return; fi
  run "$T_CONVERT" "${SIM[@]}" "${CONVERT[@]}"; rc=$?
  local imported verified
  imported=$(grep -oE 'imported [0-9]+ HF tensors \([a-z-]+ layout\)' "$PARTLOG")
  verified=$(grep -oE 'max relative logits difference [^ ]+( > [^ ]+)?,? \(?top-1 agreement [0-9.]+' "$PARTLOG")
  if ((rc == 0)) && [[ -n $verified ]]; then
    add 2 "import-hf" PASS "$imported, loaded again: $verified (fp32; tolerance 1e-4) [$((SECONDS - t0))s]"
    return
  fi
  local why="${verified:-$(last_error)}"
  if ((!DRY)) && [[ -n $verified ]] && (( T_CONVERT - (SECONDS - t0) > 25 )); then
    header "2) again without TF32 (NVIDIA_TF32_OVERRIDE=0): is it the tensor cores' fp32 mode?"
    if run "$((T_CONVERT - (SECONDS - t0)))" env NVIDIA_TF32_OVERRIDE=0 "${CONVERT[@]}" --force; then
      why="$why; passes with NVIDIA_TF32_OVERRIDE=0: TF32 (cuDNN convolutions allow it by default) is over the fp32 tolerance"
    fi
  fi
  add 2 "import-hf" FAIL "$why [$((SECONDS - t0))s]"
}

tests_part() {  # 3), 3+) and 5): one pytest run of every gpu-marked test
  header "3) 5) the gpu-marked tests: NaN/inf step under bf16 + distributed optimizer, host syncs per step, ..."
  local t0=$SECONDS st why
  run "$T_TESTS" "${GPU_TESTS[@]}"
  # why a test did not pass: its short-summary line (pytest -rfEs: the failure's message, the skip's reason)
  why() { [[ $1 == PASS ]] || echo " ($(grep -m1 -E "^(FAILED|ERROR) [^ ]*$2|^SKIPPED \[[0-9]+\] $2:" "$PARTLOG" | cut -c1-240))"; }
  st=$(test_status tests/training/test_gpu_nonfinite.py)
  add 3 "nan-skip" "$st" "$(first 'nonfinite:')$(why "$st" tests/training/test_gpu_nonfinite.py)"
  st=$(test_status tests/training/test_gpu_syncs.py)
  add 5 "host syncs" "$st" "$(first 'syncs:'); most: $(sync_sites)$(why "$st" tests/training/test_gpu_syncs.py)"
  local fails bf16; fails=$(grep -cE '^(FAILED|ERROR) ' "$PARTLOG"); bf16=$(first 'cuda: ')
  add 3+ "gpu tests" "$( ((fails == 0)) && grep -qE '[0-9]+ passed' "$PARTLOG" && echo PASS || echo FAIL)" \
    "$(pytest_counts) in ${#GPU_TEST_FILES[@]} files [$((SECONDS - t0))s]${bf16:+; bf16 step: $bf16}$( ((fails)) && \
      echo "; failed: $(sed -nE 's/^(FAILED|ERROR) ([^ ]+).*/\2/p' "$PARTLOG" | paste -sd' ' -)"); skips: $(skip_reasons)"
}

tests_part_dry() {  # the CPU equivalents of 3), 3+) and 5)
  header "3) 5) dry: collect the gpu-marked tests with the GPU machine's packages only"
  local rc
  run 120 "${SIM[@]}" "$PY" -m pytest --collect-only -q -m gpu "${GPU_TEST_FILES[@]}" -p no:cacheprovider \
    -p no:warnings; rc=$?
  local collected; collected=$(pytest_counts)
  header "3) 3+) 5) dry: each test's script on the CPU (gloo): NaN/inf step under bf16 + distributed optimizer, bf16 vs fp32 step, host syncs of the loop (HostSyncCounter)"
  local nan=tests/training/test_gpu_nonfinite.py bf16=tests/training/test_gpu_bf16.py syncs=tests/training/test_gpu_syncs.py
  run 240 "${SIM[@]}" "$PY" tools/device_parts.py scripts "$nan" "$bf16" "$syncs"
  script_ok() { grep -qx "$1: passed" "$PARTLOG" && echo PASS || echo FAIL; }
  add 3 "nan-skip" "$(script_ok "$nan")" "dry: $(first 'nonfinite:')"
  [[ $(script_ok "$bf16") == PASS ]] || rc=1
  add 3+ "gpu tests" "$(verdict $rc)" "dry: $collected in ${#GPU_TEST_FILES[@]} files; bf16 step on the CPU: $(first 'cpu: ')"
  add 5 "host syncs" "$(script_ok "$syncs")" "dry: $(first 'syncs:'); most: $(sync_sites)"
}

eval_part() {  # 4)
  header "4) v2pe-data synth --needles, then v2pe-eval teacher-forced on part 1's checkpoint"
  local t0=$SECONDS
  if ! wait_bg synth; then add 4 eval FAIL "v2pe-data synth failed: $(last_error)"; return; fi
  local written; written=$(grep -oE 'wrote [0-9]+ needle samples' "$PARTLOG")
  local ck=() weights="random weights (part 1 left no checkpoint)"
  if [[ -f $W/ckpt/latest ]]; then ck=(--ckpt "$W/ckpt"); weights="part 1's checkpoint"; fi
  if run "$T_EVAL" "${SIM[@]}" "${EVAL[@]}" "${ck[@]}" &&
     run 10 "$PY" tools/device_parts.py eval "$W/eval/results.json"; then
    add 4 eval PASS "$written; $weights: $(first 'eval:') [$((SECONDS - t0))s]"
  else
    add 4 eval FAIL "$weights: $(first 'eval:') $(last_error) [$((SECONDS - t0))s]"
  fi
}

bench_part() {  # 6)
  local cmd=("${BENCH_CMD[@]}") lim=$T_BENCH label="InternVL2-2B, local spec, bf16, 8K and 16K tokens"
  if ((DRY)); then cmd=("${SIM[@]}" "${BENCH_DRY_CMD[@]}"); lim=120; label="dry: tiny preset, 256 and 512 tokens, CPU"; fi
  header "6) training-step benchmark ($label), recompute from v2pe-plan for one 78 GiB GPU"
  local t0=$SECONDS rc
  run "$lim" "${cmd[@]}"; rc=$?
  local n over results
  n=$(grep -c '^result:' "$PARTLOG")
  over=$(sed -nE 's/^result:.*plan\/measured ([0-9.]+).*/\1/p' "$PARTLOG" | awk -v o="$BENCH_OVER" '$1 * o < 1' | wc -l)
  results=$(sed -nE 's/^result: //p' "$PARTLOG" | paste -sd'|' - | sed 's/|/ || /g')
  if ((rc == 0 && n == 2 && over == 0)); then add 6 bench PASS "$results [$((SECONDS - t0))s]"
  else
    add 6 bench FAIL "${results:-no result}$( ((over)) && echo "; max_memory_allocated over ${BENCH_OVER} x the plan") $(last_error) [$((SECONDS - t0))s]"
  fi
}

not_covered() {  # 7)
  add 7 "not covered" "N/A" "one GPU cannot check: multi-rank NCCL (the CP ring and all-to-all exchange and the \
image-feature exchange, TP/SP collectives, PP stages, DP gradient reduce and the distributed optimizer's gathers \
across ranks); Transformer Engine (not on the image: the te spec, thd attention, TE's CP); DALI (not on the \
image: GPU JPEG decode; Pillow tiled here). The CPU suite covers their logic with gloo ranks and fakes."
}

memory_numbers() {  # "tokens/recompute: saved x, peak y" (planned/measured) per measured row of the table
  grep -E '^\| [0-9]+ \|' "$PARTLOG" | awk -F'|' '{gsub(/ /, ""); printf "%s/%s saved %s peak %s; ", $2, $4, $8, $12}'
}

memory_part() {  # --memory: the planner's activation terms on the GPU, bare model, each recompute setting
  local cmd=("${MEMORY_CMD[@]}")
  ((DRY)) && cmd=("${SIM[@]}" "${MEMORY_DRY_CMD[@]}")
  header "m) memory: $( ((DRY)) && echo 'dry: tiny preset on the CPU' || echo 'InternVL2-2B shapes, bf16, 8K and 32K'), saved bytes and max_memory_allocated vs v2pe-plan"
  local t0=$SECONDS
  if run 420 "${cmd[@]}"; then add m "memory" PASS "planned/measured: $(memory_numbers)[$((SECONDS - t0))s]"
  else add m "memory" FAIL "$(last_error) $(memory_numbers)"; fi
}

print_real_commands() {
  header "the real run executes (on the GPU machine, from the repo root; \$W is a fresh mktemp folder)"
  define_cmds python3 /tmp/v2pe_device_site nccl '$W'
  echo "export PYTHONPATH=\$PWD:/tmp/v2pe_device_site V2PE_EXPECT_SITE=/tmp/v2pe_device_site V2PE_REQUIRE_CUDA=1"
  printf '+ %s\n' "${INSTALL[*]}" "${INFO[*]}"
  if ((MEMORY)); then printf '+ %s\n' "${MEMORY_CMD[*]}"; return; fi
  printf '+ %s &  (background)\n' "${FIXTURE[*]}" "${SYNTH[*]}"
  printf '+ MASTER_PORT=<free> %s &  (three at once)\n' "${TRAIN_FULL[*]}" "${TRAIN_FULL2[*]}" "${TRAIN_HALF[*]}"
  printf '+ MASTER_PORT=<free> %s  (again: resumes)\n' "${TRAIN_HALF[*]}"
  printf '+ %s\n' "python3 tools/device_parts.py losses --tol $RESUME_TOL_CUDA \$W/full.log \$W/full2.log \$W/half1.log \$W/half2.log"
  printf '+ %s\n' "${CONVERT[*]}" "${GPU_TESTS[*]}" "${EVAL[*]} --ckpt \$W/ckpt" \
    "python3 tools/device_parts.py eval \$W/eval/results.json" "${BENCH_CMD[*]}"
}

main() {
  echo "device_check $( ((DRY)) && echo '--dry-run ')$( ((MEMORY)) && echo '--memory ')on $(hostname) at $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  if ((DRY)); then
    PY=${PYTHON:-}
    if [[ -z $PY ]]; then if [[ -x .venv/bin/python ]]; then PY=$REPO/.venv/bin/python; else PY=python3; fi; fi
    SITE=$DRY_SITE BACKEND=gloo
    # The CPU is slower than the GPU machine and CI's is shared: the same parts, twice the time.
    DEADLINE=$((2 * DEADLINE)) T_SETUP=$((2 * T_SETUP)) T_TRAIN=$((2 * T_TRAIN)) T_TRAIN_FIRST=$((2 * T_TRAIN_FIRST))
    T_CONVERT=$((2 * T_CONVERT)) T_TESTS=$((2 * T_TESTS)) T_EVAL=$((2 * T_EVAL)) T_BENCH=$((2 * T_BENCH))
    T_PREP=$((2 * T_PREP))
    print_real_commands
    # Once the wheels are in, what the GPU image lacks is made unimportable (tools/device_sim).
    local allow
    allow=$(cd .whl 2>/dev/null && ls ./*.whl 2>/dev/null | sed -E 's#^\./##; s/-.*//' | paste -sd' ' -)
    SIM=(env PYTHONPATH="$REPO/tools/device_sim:$REPO:$SITE" V2PE_DEVICE_SIM="$REPO/tools/device_image_packages.txt"
         V2PE_DEVICE_SIM_ALLOW="$allow")
  else
    PY=python3 SITE=/tmp/v2pe_device_site BACKEND=nccl SIM=()
    export PYTHONPATH="$REPO:$SITE" V2PE_EXPECT_SITE="$SITE" V2PE_REQUIRE_CUDA=1
  fi
  define_cmds "$PY" "$SITE" "$BACKEND" "$W"
  if ! setup_part; then
    if ((MEMORY)); then add m memory SKIP "setup failed"
    else for p in 1 2 3 3+ 4 5 6; do add "$p" "-" SKIP "setup failed"; done; fi
  elif ((MEMORY)); then memory_part
  else
    start_prep
    train_part
    convert_part
    if ((DRY)); then tests_part_dry; else tests_part; fi
    eval_part
    bench_part
  fi
  ((MEMORY)) || not_covered
  header "SUMMARY$( ((DRY)) && echo ' (dry run: CPU equivalents)')"
  printf '%s\n' "${SUMMARY[@]}" | sort -s -k1,1n   # a) first, then 1..7 (3+ after 3)
  echo "total ${SECONDS}s"
  for s in "${SUMMARY[@]}"; do [[ $s == *" FAIL "* ]] && return 1; done
  return 0
}

main 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
if [[ -n ${OUT:-} ]]; then mkdir -p "$OUT" && cp "$LOG" "$OUT/device_check.log" && chmod a+r "$OUT/device_check.log"; fi
rm -rf "$LOG" "$PARTLOG" "$W"
[[ -n $DRY_SITE ]] && rm -rf "$DRY_SITE"
exit "$status"
