#!/usr/bin/env bash
# Install Refinery into ./.venv: a CPU build of PyTorch first (so no dependency pulls a
# multi-GB CUDA build), then the project with its test tools. Idempotent.
#   TORCH_SPEC=...  the torch requirement to install first (default torch==2.13.0)
#   PYTHON=...      the interpreter that creates the venv (default python3)
#   REFINERY_EXTRAS the extras to install (default test)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
"$VENV/bin/python" -m pip install -q -e ".[${REFINERY_EXTRAS:-test}]"
# The filter's compiled loops: compiled once here (tens of seconds, then cached beside the sources),
# not on the first run; with the cache in place this takes a second or two.
"$VENV/bin/python" -c 'from refinery.tasks.filter import compile_loops; print(f"filter loops compiled or loaded in {compile_loops():.1f} s")'
# OCR for images and scanned PDFs: Tesseract and Poppler from the system packages where we may install them.
if ! command -v tesseract >/dev/null 2>&1 || ! command -v pdftoppm >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get install -y -q tesseract-ocr poppler-utils >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q tesseract-ocr poppler-utils >/dev/null 2>&1)) \
      || echo "note: could not install tesseract-ocr; image files will be quarantined with reason ocr_unavailable"
  else
    echo "note: tesseract is not installed; image OCR is off (install tesseract-ocr to enable it)"
  fi
fi
echo "installed: $("$VENV/bin/python" -c 'import refinery, torch; print("refinery", refinery.__version__, "torch", torch.__version__)')"
