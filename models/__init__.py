"""mptrec.models."""
