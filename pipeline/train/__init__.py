"""mptrec.pipeline.train: stage 1, multi-task pre-training (job, loop, EM labels, metrics log)."""
