"""Machine-stamped results: every benchmark run writes one JSON file under benchmarks/results/.

The stamp says what the numbers depend on: the CPU and the features the kernels use, the cores
and threads, the library versions, the date and the commit (and whether the tree had
uncommitted changes). benchmarks/README.md cites these files by name.
"""

import datetime
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512vl", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        flags = []
    return {flag: flag in flags for flag in CPU_FLAGS}


def _git(*args, folder):
    try:
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def stamp(threads, package_folder):
    """What the numbers of a run depend on; ``package_folder`` is the qlora_np tree that ran."""
    import numba
    import numpy
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), "numpy": numpy.__version__, "numba": numba.__version__,
            "qlora_np_tree": package_folder,
            "commit": _git("rev-parse", "HEAD", folder=package_folder),
            "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no", folder=package_folder))}


def _slug(text):
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "label"


def write_results(script, arguments, results, threads, package_folder, label="", output_dir=RESULTS_DIR):
    """Write ``results`` with the run's stamp to ``output_dir``/<script>-<UTC time>-<machine>[-<label>].json,
    atomically (a temporary file renamed into place); returns the path. <machine> is a short hash
    of the host name and CPU model, so runs on different machines never share a name."""
    os.makedirs(output_dir, exist_ok=True)
    document = {"script": script, "arguments": arguments, "label": label, "argv": sys.argv,
                **stamp(threads, package_folder), "results": results}
    when = document["date_utc"].replace(":", "").replace("+00:00", "Z").replace("+0000", "Z")
    machine = hashlib.sha256(f"{platform.node()} {document['cpu']}".encode()).hexdigest()[:8]
    name = f"{script}-{when}-{machine}{'-' + _slug(label) if label else ''}.json"
    path = os.path.join(output_dir, name)
    handle, temporary = tempfile.mkstemp(dir=output_dir, suffix=".tmp")
    with os.fdopen(handle, "w") as out:
        json.dump(document, out, indent=1)
    os.replace(temporary, path)
    return path
