"""Multi-process training: worker processes on one machine (`fusegrad.parallel.workers`) and MPI ranks
across machines (`fusegrad.parallel.mpi`)."""
