"""Multi-process training: data parallelism over MPI (`fusegrad.parallel.mpi`)."""
