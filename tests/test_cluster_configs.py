"""cluster/: every launcher config is one `ray up` accepts, and submit_job.sh is sound.

The configs are checked against the cluster-launcher JSON schema shipped in the Ray
wheel (``ray/autoscaler/ray-schema.json``) plus the two launcher rules the schema cannot
express; deliberately broken copies prove the same check rejects what it should. No test
here starts Ray.
"""

from __future__ import annotations

import copy
import importlib.resources
import ipaddress
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML comes with Ray: pip install -e '.[ray]'")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema comes with ray[default]: pip install -e '.[ray]'")
pytest.importorskip("ray.autoscaler", reason="pip install -e '.[ray]'")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CONFIGS = sorted(CLUSTER.glob("*.yaml"))
SUBMIT = CLUSTER / "submit_job.sh"
# A pip install of a crystallize distribution by name, from PyPI: none of ours is published.
FROM_PYPI = re.compile(r"pip3? install[^;&|]*?(?:^|[\s'\"])crystallize(?:-lab|-ml)?(?:\[[^\]]*\])?(?=[\s'\"=<>]|$)")
DOC_NETWORKS = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]
COMMAND_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


def ray_schema() -> dict:
    return json.loads((importlib.resources.files("ray.autoscaler") / "ray-schema.json").read_text())


def validate_cluster_config(config: dict) -> None:
    """Check a launcher config as `ray up` would before it contacts any machine.

    Raises:
        jsonschema.ValidationError: the config breaks Ray's cluster-launcher schema.
        ValueError: it breaks a launcher rule the schema cannot express.
    """
    jsonschema.validate(config, ray_schema())
    provider = config["provider"]
    if provider["type"] == "local":
        for key in ("available_node_types", "head_node_type"):
            if key in config:
                raise ValueError(f"the local provider derives {key} itself; remove it")
        if "head_ip" not in provider or "worker_ips" not in provider:
            raise ValueError("the local provider needs provider.head_ip and provider.worker_ips")
    elif "available_node_types" in config:
        head = config.get("head_node_type")
        if head not in config["available_node_types"]:
            raise ValueError(f"head_node_type {head!r} is not one of available_node_types")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def shell_commands(config: dict) -> list[str]:
    return [cmd for key in COMMAND_LISTS for cmd in config.get(key, [])]


def test_cluster_folder_has_both_configs():
    assert {p.name for p in CONFIGS} >= {"aws.yaml", "local.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid(path):
    validate_cluster_config(load(path))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_passes_rays_own_preflight(path):
    # The same preparation and validation `ray up` runs before launching anything.
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as exc:  # a private module: skip, don't break, if Ray moves it
        pytest.skip(f"Ray's launcher preflight moved: {exc}")
    validate_config(prepare_config(load(path)))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_installs_crystallize_from_the_mounted_project_never_from_pypi(path):
    config = load(path)
    mounts = [remote for remote, local in config["file_mounts"].items() if local == "."]
    assert mounts, f"{path.name}: file_mounts must mount the project dir"
    editable = [
        cmd
        for cmd in config["setup_commands"]
        if "pip install" in cmd and any(re.search(rf"-e\s+['\"]?{re.escape(m)}", cmd) for m in mounts)
    ]
    assert editable, f"{path.name}: setup_commands must `pip install -e` the mounted project ({mounts[0]})"
    pypi = [cmd for cmd in shell_commands(config) if FROM_PYPI.search(cmd)]
    assert pypi == [], f"{path.name}: installs crystallize by name from PyPI, where it is not published"


def test_the_pypi_check_can_fail():
    assert FROM_PYPI.search('pip install -U "crystallize-lab[ray]"')
    assert FROM_PYPI.search("~/env/bin/pip install crystallize==0.1")
    assert not FROM_PYPI.search("pip install -q -e ~/project")
    assert not FROM_PYPI.search('pip install "ray[default]==2.60.0" -e ~/project')


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shell_command_parses(path):
    # YAML quoting can silently turn a command into a mapping or cut it at ' #'.
    commands = shell_commands(load(path))
    assert commands
    for cmd in commands:
        assert isinstance(cmd, str), f"{path.name}: {cmd!r} is not a string"
        check = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert check.returncode == 0, f"{path.name}: {cmd!r}: {check.stderr}"


def test_aws_config_is_one_head_and_up_to_four_cpu_workers():
    config = load(CLUSTER / "aws.yaml")
    assert config["provider"]["type"] == "aws"
    workers = {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}
    assert [(t.get("min_workers", 0), t["max_workers"]) for t in workers.values()] == [(0, 4)]
    assert config["max_workers"] == 4


def test_local_config_uses_only_documentation_addresses():
    provider = load(CLUSTER / "local.yaml")["provider"]
    assert provider["type"] == "local"
    for ip in [provider["head_ip"], *provider["worker_ips"]]:
        assert any(ipaddress.ip_address(ip) in net for net in DOC_NETWORKS), f"{ip} is not a placeholder address"


# -- the check can fail ---------------------------------------------------------
def _misspelled_key(c):
    c["setup_comands"] = c.pop("setup_commands")


def _min_workers_not_a_number(c):
    next(t for n, t in c["available_node_types"].items() if n != c["head_node_type"])["min_workers"] = "two"


def _provider_without_type(c):
    del c["provider"]["type"]


def _command_not_a_string(c):
    c["setup_commands"].append({"pip install x": None})  # what an unquoted ': ' turns into


def _unknown_head_type(c):
    c["head_node_type"] = "ray.head.missing"


@pytest.mark.parametrize(
    "breakage, error",
    [
        (_misspelled_key, jsonschema.ValidationError),
        (_min_workers_not_a_number, jsonschema.ValidationError),
        (_provider_without_type, jsonschema.ValidationError),
        (_command_not_a_string, jsonschema.ValidationError),
        (_unknown_head_type, ValueError),
    ],
    ids=lambda v: getattr(v, "__name__", "").lstrip("_"),
)
def test_broken_aws_config_is_rejected(breakage, error):
    config = copy.deepcopy(load(CLUSTER / "aws.yaml"))
    validate_cluster_config(copy.deepcopy(config))  # intact: accepted
    breakage(config)
    with pytest.raises(error):
        validate_cluster_config(config)


def test_broken_local_config_is_rejected():
    config = load(CLUSTER / "local.yaml")
    config["available_node_types"] = {"x": {"resources": {}, "node_config": {}}}
    with pytest.raises(ValueError, match="derives available_node_types"):
        validate_cluster_config(config)
    config = load(CLUSTER / "local.yaml")
    del config["provider"]["worker_ips"]
    with pytest.raises(ValueError, match="worker_ips"):
        validate_cluster_config(config)


# -- submit_job.sh ----------------------------------------------------------------
def test_submit_script_is_valid_bash():
    check = subprocess.run(["bash", "-n", str(SUBMIT)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_broken_script_fails_the_same_check(tmp_path):
    broken = tmp_path / "submit_job.sh"
    broken.write_text(SUBMIT.read_text().replace("fi\n", "", 1))
    assert subprocess.run(["bash", "-n", str(broken)], capture_output=True).returncode != 0


def project_dependencies() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the list is simple enough to read
        block = re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M)
        return re.findall(r'"([^"]+)"', block.group(1)) if block else []
    return tomllib.loads(text)["project"]["dependencies"]


def _submit_command(**env: str) -> list[str]:
    """The `ray job submit` command submit_job.sh would run (its dry run)."""
    environ = {
        **os.environ,
        "RAY_ADDRESS": "http://127.0.0.1:8265",
        "CRYSTALLIZE_DRY_RUN": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        **env,
    }
    proc = subprocess.run(
        ["bash", str(SUBMIT), "--replicates", "3"], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_submit_script_ships_the_project_and_installs_only_its_dependencies():
    command = _submit_command()
    assert command[:3] == ["ray", "job", "submit"]
    assert command[command.index("--working-dir") + 1] == "."  # crystallize/ travels with the job
    assert (ROOT / "crystallize" / "__init__.py").exists() and (ROOT / "crystallize_ray" / "__init__.py").exists()
    runtime_env = json.loads(command[command.index("--runtime-env-json") + 1])
    assert runtime_env["pip"] == project_dependencies()
    assert not any(FROM_PYPI.search(f"pip install {spec}") for spec in runtime_env["pip"])
    assert command[command.index("--") + 1 :] == ["python", "examples/quickstart.py", "--replicates", "3"]


def test_submit_script_installs_nothing_when_told_the_nodes_have_it():
    command = _submit_command(CRYSTALLIZE_PIP="", CRYSTALLIZE_CACHE_DIR="/mnt/shared/cache")
    runtime_env = json.loads(command[command.index("--runtime-env-json") + 1])
    assert runtime_env == {"env_vars": {"CRYSTALLIZE_CACHE_DIR": "/mnt/shared/cache"}}


def test_submit_script_without_address_says_what_to_set(tmp_path):
    # The submission itself runs against a real cluster in tests/test_ray_cluster.py.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        ["bash", str(SUBMIT)], cwd=CLUSTER.parent, env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert "set RAY_ADDRESS" in proc.stderr
