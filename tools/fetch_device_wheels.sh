#!/usr/bin/env bash
# Fetch into .whl/ the wheels that the lent GPU machine lacks for tools/device_check.sh, which
# carries them there (it has no network). Idempotent: wheels already in .whl/ are kept, any other
# file there is removed, so .whl/ holds exactly this list.
#
#   tools/fetch_device_wheels.sh           download what is missing, print sizes, fail over the limit
#   tools/fetch_device_wheels.sh --check   no download: fail if a wheel is missing or over the limit
#
# The list: what the check imports that the machine's image (tools/device_image_packages.txt) does
# not have. megatron-core's hard requirements (torch, numpy, packaging) are on the image; omegaconf
# >= 2.4 vendors its antlr4 runtime. mlflow (tracking.backend=none), nvidia-dali (the loader falls
# back to Pillow) and transformer-engine (TE tests skip) are not needed, and are too big to carry.
# `tools/device_check.sh --dry-run` proves the list: it hides every other package that the image
# lacks. Versions come from constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(megatron-core omegaconf)
LIMIT_MIB=60
DIR=.whl
PY=${PYTHON:-}
if [[ -z $PY ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
check_only=0
[[ ${1:-} == --check ]] && check_only=1

mkdir -p "$DIR"
want=()
for name in "${WHEELS[@]}"; do
  ver=$(grep -i -m1 "^${name}==" constraints.txt | cut -d= -f3)
  [[ -n $ver ]] || { echo "fetch_device_wheels: $name has no pinned version in constraints.txt" >&2; exit 1; }
  stem="${name//-/_}-${ver}-"
  found=$(ls "$DIR/$stem"*.whl 2>/dev/null | head -1 || true)
  if [[ -z $found ]]; then
    if (( check_only )); then
      echo "fetch_device_wheels: $DIR/$stem*.whl missing (run tools/fetch_device_wheels.sh)" >&2; exit 1
    fi
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$DIR" "${name}==${ver}"
    found=$(ls "$DIR/$stem"*.whl | head -1)
  fi
  want+=("$(basename "$found")")
done

for f in "$DIR"/* "$DIR"/.[!.]*; do
  [[ -e $f ]] || continue
  keep=0
  for w in "${want[@]}"; do [[ $(basename "$f") == "$w" ]] && keep=1; done
  if (( ! keep )); then
    if (( check_only )); then echo "fetch_device_wheels: $f is not in the list (it would travel too)" >&2; exit 1; fi
    echo "removing $f (not in the list)"; rm -rf "$f"
  fi
done

total=0
for w in "${want[@]}"; do
  size=$(stat -c %s "$DIR/$w")
  total=$((total + size))
  awk -v s="$size" -v f="$DIR/$w" 'BEGIN { printf "%8.2f MiB  %s\n", s / 1048576, f }'
done
awk -v s="$total" -v l="$LIMIT_MIB" 'BEGIN { printf "%8.2f MiB  total (limit %d MiB)\n", s / 1048576, l }'
if (( total > LIMIT_MIB * 1048576 )); then
  echo "fetch_device_wheels: over the ${LIMIT_MIB} MiB limit" >&2
  exit 1
fi
