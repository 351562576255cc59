#!/usr/bin/env bash
# A venv with the official TDPO-R code's pins, for benchmarks/side_by_side.py:
#   bash benchmarks/official/make_venv.sh VENV_DIR
# torch 2.13.0 is the local CPU wheel; the rest are the official pins where they install on
# Python 3.11 with torch 2.13 (accelerate 0.17 imports pkg_resources: setuptools < 80).
set -euo pipefail
venv="${1:?usage: make_venv.sh VENV_DIR}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q "diffusers==0.17.1" "accelerate==0.17.0" "transformers==4.30.2" \
    "tokenizers==0.13.3" "huggingface_hub==0.25.2" "numpy<2" "ml-collections==1.1.0" \
    "absl-py" "inflect==6.0.4" "pydantic==1.10.9" "safetensors<0.5" pillow psutil
"$venv/bin/pip" install -q "setuptools<80"
echo "official venv ready: $venv/bin/python"
