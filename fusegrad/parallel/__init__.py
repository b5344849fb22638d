"""Multi-process training: worker processes on one machine (`fusegrad.parallel.workers`), MPI ranks (`fusegrad.parallel.mpi`)."""
