"""Where the files that ship inside the package live: trained performance models and SLO presets.

They are package data, so the CLI, the sidecar and the coordinator find them wherever the package
is installed (a checkout, a wheel, the container image) and whatever the working directory is.
"""

from __future__ import annotations

from pathlib import Path

_DATA = Path(__file__).resolve().parent / "data"
SHIPPED_MODELS_DIR = _DATA / "models"  # <gpu>/<model>-tp<N>/{ips.onnx,card.json,capacity.json}, lengths/
SHIPPED_POLICIES_DIR = _DATA / "policies"  # SLO presets, <name>.toml
