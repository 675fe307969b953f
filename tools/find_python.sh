#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 interpreter: python3.13/python3.12 on PATH, else one of pyenv's.
# (pyenv shims exist for every installed version but only run the selected one, so each candidate is
# actually executed rather than trusted by name.)
set -u
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
for c in "${PYTHON:-}" python3.13 python3.12 python3; do
  [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && ok "$c" && { command -v "$c"; exit 0; }
done
if command -v pyenv >/dev/null 2>&1; then
  root=$(pyenv root)
  for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9]|[2-9][0-9])(\.[0-9]+)?$' | sort -t. -k1,1n -k2,2n -k3,3n -r); do
    p="$root/versions/$v/bin/python3"
    [ -x "$p" ] && ok "$p" && { echo "$p"; exit 0; }
  done
fi
echo "error: no Python >= 3.12 found (install python3.12, or set PYTHON=/path/to/python3.12)" >&2
exit 1
