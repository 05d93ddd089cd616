"""mptrec.pipeline."""
