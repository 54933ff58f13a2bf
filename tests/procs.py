"""Process harness for the tests: the same one the local simulation runner uses."""

from simulations.harness.procs import *  # noqa: F403
from simulations.harness.procs import (  # noqa: F401 - names the tests import explicitly
    VENV_BIN,
    Proc,
    Procs,
    descendants,
    flwr_env,
    free_port,
    port_open,
    wait_for,
)
