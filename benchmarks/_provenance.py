"""Where and when a benchmark ran: recorded in every results JSON.

``benchmarks/results.py`` prints it under each table it renders, so no figure
in the README or the docs is shown without its machine and date.
"""

import datetime
import json
import os
import platform


def cpu() -> str:
    """The CPU's model name (machines of one kind differ: AVX-512 or not, so float results differ)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict:
    """The date, the machine (CPU architecture, cores, OS) and the JAX devices of this process."""
    import jax  # imported here: bench_data_parallel's parent process sets XLA_FLAGS for its children first

    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "cpu": cpu(),
        "jax": jax.__version__,
        "devices": f"{jax.devices()[0].platform} x{jax.device_count()}",
        "load_average": round(os.getloadavg()[0], 1),
    }


def write_json(path: str, payload: dict) -> None:
    """Writes ``payload`` with the provenance, atomically (a crashed benchmark leaves the old results)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({**provenance(), **payload}, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
