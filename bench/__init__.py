"""mptrec.bench."""
