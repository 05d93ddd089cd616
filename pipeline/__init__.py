"""mptrec.pipeline: the core (config, build, sharding, checkpoint, run folder, collectives) and the stages."""
