"""mptrec.bench."""

#: The sections of ``mptrec bench``, in run order (here so that the CLI can list them without
#: importing torch).
SECTIONS = ("stage1", "scaling", "profile", "allocator", "dense", "loader", "new_task", "eval", "growth",
            "serving")
