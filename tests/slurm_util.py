"""Whether the single-node CI cluster of scripts/slurm/start.sh is usable (shared by the SLURM tests)."""
import shutil
import subprocess
from functools import lru_cache


@lru_cache(maxsize=1)
def cluster_down_reason() -> str:
    """Why the CI cluster cannot be used, or "" when it is up with a usable node."""
    if shutil.which("sinfo") is None:
        return "sinfo not found: SLURM is not installed (bash scripts/slurm/start.sh installs and starts it)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
        if "is UP" not in ping.stdout:  # checked first: sinfo retries for ~9 s when slurmctld is down
            first_line = (ping.stdout.strip() or ping.stderr.strip()).splitlines()[:1]
            return f"slurmctld is not up ({' '.join(first_line)}): bash scripts/slurm/start.sh"
        node = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "scontrol ping / sinfo timed out: start the cluster with bash scripts/slurm/start.sh"
    if node.stdout.strip() not in {"idle", "mixed", "allocated", "completing"}:
        return f"partition debug has no usable node ({node.stdout.strip() or node.stderr.strip()!r})"
    return ""
