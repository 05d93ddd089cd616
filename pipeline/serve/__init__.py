"""mptrec.pipeline.serve: the serving artifact (``mptrec export``) and batch scoring (``mptrec predict``)."""
