"""mptrec.launch."""
