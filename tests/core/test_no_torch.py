"""batchllm/core is a pure-CPU planner: importing it must not import torch."""
import pkgutil
import subprocess
import sys

import batchllm.core


def test_core_modules_import_no_torch():
    names = [f"batchllm.core.{m.name}" for m in pkgutil.iter_modules(batchllm.core.__path__)]
    assert {"batchllm.core.scheduler", "batchllm.core.block_pool"} <= set(names)
    code = ("import sys\n" + "".join(f"import {n}\n" for n in names)
            + "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            + "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
