"""Vision-language segmentation baselines: CLIPSeg, CRIS, BiomedCLIPSeg(-D); prompt learners; adapters."""
