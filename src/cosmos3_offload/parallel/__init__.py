"""Several processes, one GPU each: the process groups of a `ParallelLayout` and the exchanges the
split forward makes over them (CFG branches side by side, Ulysses sequence parallelism)."""
