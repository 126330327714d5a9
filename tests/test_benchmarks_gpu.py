"""``benchmarks/gpu.sh`` on a machine without an accelerator: it says so and runs nothing."""

import os
import subprocess
import sys

from helpers import user_environment


def test_gpu_script_refuses_a_cpu_only_jax(tmp_path):
    env = dict(user_environment(), PYTHON=sys.executable)
    result = subprocess.run(
        ["bash", "benchmarks/gpu.sh", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no accelerator visible to JAX" in result.stdout
    assert sorted(os.listdir(tmp_path)) == ["gpu.log"]
