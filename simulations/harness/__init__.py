"""Running fedvox for real on one machine: the processes a benchmark, an audit or a test starts.

- `procs.py`: start, watch and end processes by PID (ports, logs, Flower's environment);
- `local.py`: a local SuperLink + `flwr run` simulation federation (`LocalFederation`);
- `deploy.py`: a local deployment, one SuperNode per hospital, started as the units start them;
- `units.py`: the systemd units' ExecStart read back, so the harness starts what hospitals run;
- `inprocess.py`: the ServerApp and ClientApps in this process, messages passed by hand.
"""
