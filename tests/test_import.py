"""Importing qlora_np changes nothing in the process: no environment variable, no allocator
setting, no AMX permission. Those come only from :func:`qlora_np.runtime.configure` and from
the first AMX product."""

import json
import os
import shutil
import subprocess
import sys

import pytest

IMPORT_EVERYTHING = r"""
import json, os, pkgutil, importlib
before = dict(os.environ)
import qlora_np
for name in qlora_np.__all__:
    getattr(qlora_np, name)
for info in pkgutil.walk_packages(qlora_np.__path__, "qlora_np."):
    if info.name not in ("qlora_np.kernels.cuda.kernels", "qlora_np.__main__"):
        importlib.import_module(info.name)
from qlora_np.kernels import features
from qlora_np import runtime
print(json.dumps({"changed": sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)),
                  "amx_asked": features.amx_permitted.cache_info().currsize,
                  "configured": runtime.configured,
                  "modules": sum(name.startswith("qlora_np") for name in __import__("sys").modules)}))
"""


def _run(code, env=None):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_importing_every_module_changes_no_environment_variable_and_asks_no_amx_permission():
    report = _run(IMPORT_EVERYTHING)
    assert report["changed"] == []
    assert report["amx_asked"] == 0
    assert report["configured"] is None             # neither the thread settings nor malloc's were applied
    assert report["modules"] > 40                    # the walk really imported the package


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_importing_makes_no_arch_prctl_permission_syscall(tmp_path):
    trace = tmp_path / "trace.txt"
    result = subprocess.run(["strace", "-f", "-e", "trace=arch_prctl", "-o", str(trace), sys.executable, "-c",
                             IMPORT_EVERYTHING], capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and not trace.exists():
        pytest.skip(f"strace cannot trace here: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr
    text = trace.read_text()
    assert "0x1023" not in text and "ARCH_REQ_XCOMP_PERM" not in text


def test_configure_sets_the_thread_settings_only_where_the_user_did_not():
    code = "import json; from qlora_np import runtime; import os; " \
           "applied = runtime.configure(); " \
           "print(json.dumps({'applied': sorted(applied), 'recorded': runtime.configured == applied, 'env': {k: os.environ.get(k) for k in runtime.THREAD_SETTINGS}}))"
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "GOMP_SPINCOUNT")}
    fresh = _run(code, env)
    assert fresh["env"] == {"OPENBLAS_THREAD_TIMEOUT": "1", "GOMP_SPINCOUNT": "30000"}
    assert {"OPENBLAS_THREAD_TIMEOUT", "GOMP_SPINCOUNT"} <= set(fresh["applied"]) and fresh["recorded"]
    users = _run(code, {**env, "GOMP_SPINCOUNT": "7"})
    assert users["env"]["GOMP_SPINCOUNT"] == "7" and "GOMP_SPINCOUNT" not in users["applied"]


def test_the_command_line_configures_the_process(monkeypatch):
    from qlora_np import cli, runtime
    calls = []
    monkeypatch.setattr(runtime, "configure", lambda: calls.append(True) or {})
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert calls == [True]
