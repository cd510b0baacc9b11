"""Suite-wide settings (loaded before any test module imports torch)."""
import os

# As `hwrel inject` and `report` set it on busy cores (a suite run is one): idle OpenMP threads sleep instead of spinning, so the
# subprocesses many tests start (and parallel test jobs) do not fight the suite's own threads for
# the two cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: one intra-op thread per worker process
    import torch

    torch.set_num_threads(1)
