"""Agent settings: a flag beats the environment, which beats the file, which beats defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfig, advertised_address, env_names, load
from volkin.errors import InvalidArgument


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path: Path) -> None:
    config_file = tmp_path / "agent.toml"
    config_file.write_text('node_id = "from-file"\ndata_dir = "/file"\nlease_ttl = 7\n'
                           'etcd_endpoints = ["e1:2379", "e2:2379"]\n')
    config = load(["--config", str(config_file), "--node-id", "from-flag"],
                  {"VOLKIN_AGENT_NODE_ID": "from-env", "VOLKIN_AGENT_DATA_DIR": "/env"})
    assert config == AgentConfig(node_id="from-flag", data_dir=Path("/env"), lease_ttl=7,
                                 etcd_endpoints=("e1:2379", "e2:2379"))
    assert config.listen == "0.0.0.0:7480"


def test_the_environment_alone_configures_an_agent() -> None:
    config = load([], {"VOLKIN_AGENT_DATA_DIR": "/d", "VOLKIN_AGENT_NODE_ID": "n1",
                       "VOLKIN_AGENT_ETCD_ENDPOINTS": "a:1, b:2",
                       "VOLKIN_AGENT_METRICS_LISTEN": ""})
    assert (config.node_id, config.etcd_endpoints, config.metrics_listen) == (
        "n1", ("a:1", "b:2"), "")
    assert "VOLKIN_AGENT_DATA_DIR" in env_names()


@pytest.mark.parametrize(("argv", "complaint"), [
    ([], "data directory is required"),
    (["--data-dir", "/d", "--listen", "nohost"], "listen"),
    (["--data-dir", "/d", "--lease-ttl", "0"], "lease_ttl"),
    (["--data-dir", "/d", "--node-id", "a/b"], "node_id"),
    (["--data-dir", "/d", "--fence-wait", "-1"], "fence_wait"),
    (["--data-dir", "/d", "--fence-wait", "nan"], "fence_wait"),
    (["--data-dir", "/d", "--config", "/does/not/exist.toml"], "config file"),
])
def test_bad_settings_are_refused_with_the_setting_named(argv: list[str], complaint: str) -> None:
    with pytest.raises(InvalidArgument, match=complaint):
        load(argv, {})


def test_unknown_file_keys_are_refused(tmp_path: Path) -> None:
    config_file = tmp_path / "agent.toml"
    config_file.write_text('data_dir = "/d"\nlisten_adress = "x:1"\n')
    with pytest.raises(InvalidArgument, match="listen_adress"):
        load(["--config", str(config_file)], {})


def test_the_advertised_address_carries_the_bound_port() -> None:
    config = AgentConfig(node_id="n", data_dir=Path("/d"), listen="127.0.0.1:0")
    assert advertised_address(config, 4711) == "127.0.0.1:4711"
    assert advertised_address(AgentConfig(node_id="n", data_dir=Path("/d"),
                                          advertise="n1.example:7480"), 1) == "n1.example:7480"


def test_fence_wait_defaults_to_five_seconds_and_is_set_like_any_setting(tmp_path: Path) -> None:
    assert load(["--data-dir", "/d"], {}).fence_wait == 5.0
    config_file = tmp_path / "agent.toml"
    config_file.write_text('data_dir = "/d"\nfence_wait = 2.5\n')
    assert load(["--config", str(config_file)], {}).fence_wait == 2.5
    assert load(["--data-dir", "/d"], {"VOLKIN_AGENT_FENCE_WAIT": "0"}).fence_wait == 0.0
    assert load(["--data-dir", "/d", "--fence-wait", "1"],
                {"VOLKIN_AGENT_FENCE_WAIT": "0"}).fence_wait == 1.0
