"""``python -m dsi_mpi`` (and ``python -m mpi4py -m dsi_mpi`` under mpiexec)."""

import sys

from dsi_mpi.cli import main

if __name__ == "__main__":  # not when a spawned process imports it (costcurve.InProcess)
    sys.exit(main())
