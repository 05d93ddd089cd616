"""mptrec.data_loaders."""
