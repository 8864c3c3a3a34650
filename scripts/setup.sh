#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine with Python 3.11: system packages (espeak-ng,
# festival + voices, sox) and the pinned Python packages. Safe to re-run; skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
APT_PKGS="espeak-ng festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts sox"
missing=""
for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "[setup] apt-get install:$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
# pip only when requirements.txt (or this script) changed since the last successful setup of this checkout
STAMP=.setup_stamp
want="$($PY --version 2>&1) $(cat requirements.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
    && $PY -c "import torch, torchaudio, speechbrain, phonemizer, numba, matcha" 2>/dev/null; then
  echo "[setup] python packages up to date (requirements.txt unchanged since the last setup)"
  exit 0
fi
rm -f "$STAMP"
if ! $PY -m pip install -q --disable-pip-version-check -r requirements.txt 2>/tmp/pip_setup.err; then
  cat /tmp/pip_setup.err >&2; exit 1
fi
# Matcha-TTS (to prove its TextMelDataset loads our durations): --no-deps keeps our torch; builds one Cython module
if ! $PY -c "import matcha.utils.monotonic_align.core" 2>/dev/null; then
  $PY -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation --no-binary matcha-tts \
      matcha-tts==0.0.7.2
fi
$PY -c "import torch, torchaudio, speechbrain, phonemizer, numba, matcha" \
  || { echo "[setup] python packages did not import; see the message above" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "[setup] ok: $($PY -c 'import torch, speechbrain; print("torch", torch.__version__, "speechbrain", speechbrain.__version__)')"
