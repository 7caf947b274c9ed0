"""dsi_mpi: Distributed Speculative Inference (Timor et al., ICLR 2025) over MPI."""

__version__ = "0.1.0"
