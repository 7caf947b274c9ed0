"""``python -m dsi_mpi`` (and ``python -m mpi4py -m dsi_mpi`` under mpiexec)."""

import sys

from dsi_mpi.cli import main

sys.exit(main())
