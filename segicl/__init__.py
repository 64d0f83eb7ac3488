"""SegICL: in-context medical image segmentation.

The library (this package) holds the model: multimodal encoder, condition encoder, ControlNet
diffusion decoder, pipeline, presets and the data layer. Retrieval lives in ``retrieval``, training
in ``training`` and evaluation in ``eval``; this package never imports the latter two.
"""

from pathlib import Path

__version__ = "0.1.0"

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
CONFIGS_DIR = REPO_DIR / "configs"
"""Top-level ``configs/`` (model presets, training, accelerate, DeepSpeed, eval suites).

The project is installed editable (``pip install -e .``), so the presets are read in place."""
