"""mptrec.pipeline.eval: exact metrics, scoring, the ``mptrec eval`` job, efficiency figures and reports."""
