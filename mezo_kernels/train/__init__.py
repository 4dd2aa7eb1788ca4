"""The trainer: the run config (validated once), the run context (rank, files, resume), the loop, dev selection,
plots, batched +/-, data parallelism and the command line. It composes the layers below; it does not compute."""
