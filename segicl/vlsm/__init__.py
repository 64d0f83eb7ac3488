"""Vision-language segmentation baselines: CLIPSeg, CRIS, BiomedCLIPSeg(-D); prompt learners; adapters.

Public API::

    from segicl.vlsm import build_vlsm, load_vlsm
    model = build_vlsm("clipseg", "vpt", "configs/vlsm/clipseg_tiny.yaml")  # or a dict
    model.save_pretrained("runs/clipseg_vpt")
    probs = load_vlsm("runs/clipseg_vpt").predict(images, texts)     # list of (H, W) float arrays

See docs/vlsm.md for the models, modes, prompt levels and measured numbers.
"""

from segicl.vlsm.base import ADAPTER_MODES, MODES
from segicl.vlsm.prompts import PromptSampler, describe_mask, generate_prompts
from segicl.vlsm.registry import MODELS, VLSMModel, build_vlsm, load_config, load_vlsm

__all__ = [
    "ADAPTER_MODES",
    "MODELS",
    "MODES",
    "PromptSampler",
    "VLSMModel",
    "build_vlsm",
    "describe_mask",
    "generate_prompts",
    "load_config",
    "load_vlsm",
]
