"""mptrec.pipeline.tasks: a run's tasks (store, new-task checks, union model) and stage 2, prompt tuning."""
