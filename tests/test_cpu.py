"""Sharing the CPU: the CPUs a process may use (affinity, cgroup quota), torch's thread count, and
passive OpenMP waiting wherever mlpm-guard starts a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlpm_guard.model import cpu


def _cgroup(tmp_path: Path, proc_line: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A fake cgroup mount under ``tmp_path`` and a ``/proc/self/cgroup`` that points into it."""
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc_cgroup"
    proc.write_text(proc_line + "\n")
    return root, proc


def test_cgroup_v2_quota_is_the_smallest_on_the_way_to_the_root(tmp_path):
    root, proc = _cgroup(tmp_path, "0::/kubepods/pod1/c1", {
        "kubepods/cpu.max": "400000 100000",
        "kubepods/pod1/cpu.max": "250000 100000",
        "kubepods/pod1/c1/cpu.max": "max 100000",
    })
    assert cpu.cgroup_cpu_quota(root, proc) == 2.5


def test_cgroup_v1_quota(tmp_path):
    root, proc = _cgroup(tmp_path, "4:cpu,cpuacct:/docker/abc\n1:memory:/docker/abc", {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "150000",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
        "cpu,cpuacct/cpu.cfs_quota_us": "-1",
        "cpu,cpuacct/cpu.cfs_period_us": "100000",
    })
    assert cpu.cgroup_cpu_quota(root, proc) == 1.5


def test_a_container_without_a_cgroup_namespace_reads_the_mounts_own_folder(tmp_path):
    # /proc/self/cgroup names the host's path, which the container's mount does not have.
    root, proc = _cgroup(tmp_path, "0::/system.slice/docker-abc.scope", {"cpu.max": "100000 100000"})
    assert cpu.cgroup_cpu_quota(root, proc) == 1.0


@pytest.mark.parametrize("files", [{}, {"cpu.max": "max 100000"}, {"cpu.max": "garbage"}])
def test_no_quota_when_unlimited_missing_or_unreadable(tmp_path, files):
    root, proc = _cgroup(tmp_path, "0::/", files)
    assert cpu.cgroup_cpu_quota(root, proc) is None
    assert cpu.cgroup_cpu_quota(root, tmp_path / "no-such-file") is None


@pytest.mark.parametrize(("affinity", "quota", "expected"), [
    (8, None, 8),    # no quota: the affinity mask
    (8, 3.0, 3),     # a container limited to 3 CPUs on an 8-core machine
    (8, 1.5, 1),     # a fraction rounds down: a thread beyond the quota is throttled
    (8, 0.5, 1),     # at least one
    (2, 4.0, 2),     # taskset inside a looser quota
])
def test_available_cpus_is_the_affinity_capped_by_the_quota(monkeypatch, affinity, quota, expected):
    monkeypatch.setattr(cpu, "affinity_cpus", lambda: affinity)
    monkeypatch.setattr(cpu, "cgroup_cpu_quota", lambda root, proc: quota)
    assert cpu.available_cpus() == expected


def test_affinity_is_this_process_mask():
    assert cpu.affinity_cpus() == len(os.sched_getaffinity(0))


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_fit_threads_lowers_torchs_count_to_the_available_cpus(monkeypatch, torch_threads):
    torch.set_num_threads(2)
    monkeypatch.setattr(cpu, "available_cpus", lambda: 1)
    assert cpu.fit_threads(environ={}) == 1 and torch.get_num_threads() == 1
    monkeypatch.setattr(cpu, "available_cpus", lambda: 4)
    assert cpu.fit_threads(environ={}) == 1  # never raised above what it is


def test_fit_threads_leaves_a_count_the_environment_names(monkeypatch, torch_threads):
    torch.set_num_threads(2)
    monkeypatch.setattr(cpu, "available_cpus", lambda: 1)
    assert cpu.fit_threads(environ={"OMP_NUM_THREADS": "2"}) == 2 and torch.get_num_threads() == 2


def test_a_cpu_backbone_fits_its_threads_unless_given_num_threads(monkeypatch, torch_threads):
    from mlpm_guard import Backbone
    from mlpm_guard.model import loading

    calls = []
    monkeypatch.setattr(cpu, "fit_threads", lambda: calls.append(True))

    def no_model(*args, **kwargs):
        raise RuntimeError("no model in this test")

    monkeypatch.setattr(loading, "load_model", no_model)
    with pytest.raises(RuntimeError, match="no model"):
        Backbone(device="cpu")
    assert calls == [True]
    with pytest.raises(RuntimeError, match="no model"):
        Backbone(device="cpu", num_threads=1)
    assert calls == [True] and torch.get_num_threads() == 1


def test_passive_env_keeps_a_policy_the_user_chose():
    assert cpu.passive_env({}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert cpu.passive_env({"OMP_WAIT_POLICY": "ACTIVE"}) == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {"PATH": "/bin"}
    cpu.set_passive_wait(env)
    assert env == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE"}


def _run(code: str, env: dict[str, str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()


def test_the_mlpm_guard_script_waits_passively_from_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import os, sys, json, _mlpm_guard_launcher as launcher\n"
            "before = 'torch' in sys.modules\n"
            "sys.argv = ['mlpm-guard', '--version']\n"
            "try:\n    launcher.main()\nexcept SystemExit:\n    pass\n"
            "print(json.dumps([before, os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules]))")
    # torch is not loaded before main() sets the policy; the CLI (and torch) load after it.
    assert json.loads(_run(code, env)[-1]) == [False, "PASSIVE", True]
    assert json.loads(_run(code, {**env, "OMP_WAIT_POLICY": "ACTIVE"})[-1]) == [False, "ACTIVE", True]


def test_the_console_script_enters_through_the_launcher():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "mlpm-guard"]
    assert script.value == "_mlpm_guard_launcher:main"


def test_ray_serve_replicas_wait_passively():
    pytest.importorskip("ray.serve")
    from mlpm_guard.server.ray_serve import GuardDeployment

    options = GuardDeployment.ray_actor_options
    assert options["runtime_env"]["env_vars"]["OMP_WAIT_POLICY"] == cpu.passive_env()["OMP_WAIT_POLICY"]
