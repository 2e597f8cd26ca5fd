"""Evidence fused into ranked, calibrated hypotheses."""
