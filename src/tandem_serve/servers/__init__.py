"""Running servers as child processes: ports, process groups and their cleanup (processes.py), the launchers' common
start / stop (server_process.py) and their health endpoint (health.py)."""
