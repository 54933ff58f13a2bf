"""fedvox's SuperExec: Flower's own, with each ClientApp forked from a warm process.

Started by client/supernode.py next to a SuperNode in Flower's isolation "process" mode:

    python -m client.warm_exec --runtime-api-address 127.0.0.1:9094 --insecure --parent-pid P

Flower's SuperExec (`flwr.supercore.superexec.run_superexec`, unchanged) asks the SuperNode for
tasks and launches each ClientApp as a new `flwr-clientapp` process: a Python start plus
8-10 s of imports (torch, Opacus, MONAI) on a busy 2-core machine, for every message. Here the
launch forks this process instead, which imported those libraries once; the child runs exactly
what `flwr-clientapp` runs (`flwr.supernode.runtime.run_clientapp`, its own Runtime API
token, its own exit). Each message still runs in a process of its own that ends with it.

The app itself is not pre-imported: before a child loads the run's ClientApp it forgets every
fedvox module this process knows, so Flower imports the app from the run's installed FAB, as
`flwr-clientapp` would (run approval checks that FAB's hash).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

# The heavy libraries every fedvox ClientApp imports; none of fedvox's own modules.
WARM_MODULES = (
    "numpy",
    "torch",
    "opacus",
    "monai.transforms",
    "monai.networks",
    "monai.metrics",
    "nibabel",
    "flwr.clientapp",
    "flwr.supernode.runtime.run_clientapp",
)
APP_PACKAGES = ("client", "common", "server", "simulations")


def warm_up() -> float:
    """Import WARM_MODULES now, so a forked ClientApp finds them in memory; seconds taken."""
    import importlib

    t0 = time.perf_counter()
    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # a deployment without an optional library: cold import later
            pass
    return time.perf_counter() - t0


def _forget_app_modules() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in APP_PACKAGES:
            del sys.modules[name]


def _reseed() -> None:
    """Fresh OS entropy for the global generators this child inherited from the warm parent:
    a backstop (fedvox's DP draws use their own fresh generators, common/privacy.py), so that
    no two ClientApps ever continue one generator's sequence."""
    import random

    import numpy as np
    import torch

    torch.manual_seed(int.from_bytes(os.urandom(8), "little"))
    np.random.seed(int.from_bytes(os.urandom(4), "little"))
    random.seed(os.urandom(16))


def _run_child(spec: object) -> None:
    """In the forked child: what `flwr-clientapp` does, then exit without the parent's
    handlers (they belong to the SuperExec)."""
    from flwr.supercore.exit import exit_handler
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    code = 1
    try:
        os.setpgid(0, 0)  # its own group, like a process the SuperExec would start
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        exit_handler.registered_exit_handlers.clear()
        _reseed()
        _forget_app_modules()
        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(
                spec.root_certificates_path, spec.insecure
            ),
            parent_pid=spec.parent_pid,
            runtime_dependency_install=spec.runtime_dependency_install,
        )
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def install_fork_executor() -> None:
    """Make Flower's SuperExec fork ClientApps (other task types launch as Flower does)."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec import run_superexec as rs
    from flwr.supercore.superexec.executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import LaunchResult

    class ForkExecutor(SubprocessExecutor):
        def launch(self, spec):  # noqa: ANN001, ANN202 - Flower's ExecutionSpec/LaunchResult
            if spec.task_type != TaskType.CLIENT_APP:
                return super().launch(spec)
            if os.fork() == 0:
                _run_child(spec)
            return LaunchResult.accepted()

    original = rs.get_executor

    def get_executor(executor_type, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if executor_type == rs.ExecutorType.SUBPROCESS:
            return ForkExecutor()
        return original(executor_type, *args, **kwargs)

    rs.get_executor = get_executor
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # finished ClientApps are reaped at once


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.warm_exec")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates", default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    seconds = warm_up()
    print(f"fedvox warm SuperExec: libraries imported in {seconds:.1f} s", flush=True)
    install_fork_executor()
    from flwr.supercore.superexec.run_superexec import run_superexec

    run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates_path=args.root_certificates,
        parent_pid=args.parent_pid,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
