#!/usr/bin/env bash
# GPU check: the 124M preset's training and decode speed against transformers, and a short
# training run, on one CUDA GPU, in a few minutes; the tables are appended to bench/RESULTS.md.
#
#   bash bench/gpu_check.sh                 # on a machine with a CUDA GPU
#   bash bench/gpu_check.sh --cpu-dry-run   # the same script, tiny sizes, on the CPU, into a temporary file
#
# Nothing is installed: it runs on the machine's own Python (PYTHON=..., default python3)
# with torch, numpy, pyarrow, pydantic, tqdm, safetensors and, when present, transformers.
# The project goes on the path through a small package shim (see below), so it need not be
# installed either. GPU_CHECK_DRY_RUN=1 is the same as --cpu-dry-run; GPU_CHECK_RESULTS=PATH
# overrides where the tables go.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
dry="${GPU_CHECK_DRY_RUN:-0}"
args=()
for a in "$@"; do
    case "$a" in
        --cpu-dry-run) dry=1 ;;
        *) args+=("$a") ;;
    esac
done

shim="$(mktemp -d)"
trap 'rm -rf "$shim"' EXIT

# pyproject.toml maps the package `refinery` onto several top-level folders (refinery/,
# flows/, tasks/, model/, storage/, serving/). The shim rebuilds that mapping: a `refinery`
# package whose __init__ runs the repository's refinery/__init__.py and whose __path__ is
# the shim's folder (holding one link per mapped sub-package) followed by <repo>/refinery.
mkdir -p "$shim/refinery"
for sub in flows tasks model storage serving; do
    ln -s "$repo/$sub" "$shim/refinery/$sub"
done
cat > "$shim/refinery/__init__.py" <<PY
import os as _os

_here = _os.path.dirname(_os.path.abspath(__file__))
_root = $(printf '%s' "$repo" | "$python" -c 'import sys; print(repr(sys.stdin.read()))')
with open(_os.path.join(_root, "refinery", "__init__.py"), encoding="utf-8") as _f:
    exec(compile(_f.read(), _os.path.join(_root, "refinery", "__init__.py"), "exec"))
__path__ = [_here, _os.path.join(_root, "refinery")]
del _os, _here, _root, _f
PY

export PYTHONPATH="$shim:$repo${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# Run from the shim's folder: from the repository root, its refinery/ folder alone would
# shadow the shim (the current directory comes first on the path). `bench` comes from $repo.
cd "$shim"
# Nothing is installed: name what this Python lacks before starting.
"$python" - <<'PY'
import importlib.util
import sys

need = ["torch", "numpy", "pyarrow", "pydantic", "tqdm", "matplotlib", "safetensors"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: this Python ({sys.executable}) lacks {', '.join(missing)}; set PYTHON= to one that has them")
if importlib.util.find_spec("transformers") is None:
    print("gpu_check: transformers is not installed: the comparison rows will be left out")
PY
# The shim, not an installed copy, must provide the package.
"$python" -c "import sys, refinery.model; \
assert refinery.__file__.startswith(sys.argv[1]), refinery.__file__; \
assert refinery.model.__file__.startswith(sys.argv[1]), refinery.model.__file__; \
print('gpu_check: refinery from', sys.argv[2], '(via the shim)')" "$shim" "$repo"

if [ "$dry" = "1" ]; then
    results="${GPU_CHECK_RESULTS:-$shim/RESULTS.md}"
    "$python" -m bench.gpu_check --cpu-dry-run --results "$results" ${args[@]+"${args[@]}"}
    if [ -z "${GPU_CHECK_RESULTS:-}" ]; then
        cat "$results"
    fi
else
    results="${GPU_CHECK_RESULTS:-$repo/bench/RESULTS.md}"
    "$python" -m bench.gpu_check --results "$results" ${args[@]+"${args[@]}"}
fi
