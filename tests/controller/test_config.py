"""The controller's settings: flags, environment, file, defaults."""

from __future__ import annotations

import pytest

from controller import config
from volkin.errors import InvalidArgument


def test_history_is_compacted_every_minute_unless_told_otherwise() -> None:
    assert config.load(["--node-id", "c1"], {}).compact_every == 60.0
    assert config.load(["--node-id", "c1", "--compact-every", "0"], {}).compact_every == 0.0
    environ = {"VOLKIN_CONTROLLER_COMPACT_EVERY": "300"}
    assert config.load(["--node-id", "c1"], environ).compact_every == 300.0
    with pytest.raises(InvalidArgument, match="compact_every"):
        config.load(["--node-id", "c1", "--compact-every", "-1"], {})


def test_background_copies_start_at_most_100_blocks_a_second_while_clients_are_busy() -> None:
    assert config.load(["--node-id", "c1"], {}).busy_copy_blocks == 100
    assert config.load(["--node-id", "c1", "--busy-copy-blocks", "0"], {}).busy_copy_blocks == 0
    environ = {"VOLKIN_CONTROLLER_BUSY_COPY_BLOCKS": "400"}
    assert config.load(["--node-id", "c1"], environ).busy_copy_blocks == 400
    with pytest.raises(InvalidArgument, match="busy_copy_blocks"):
        config.load(["--node-id", "c1", "--busy-copy-blocks", "-5"], {})


def test_metrics_are_served_on_loopback_port_9470_unless_told_otherwise() -> None:
    assert config.load(["--node-id", "c1"], {}).metrics_listen == "127.0.0.1:9470"
    assert config.load(["--node-id", "c1", "--metrics-listen", ""], {}).metrics_listen == ""
    environ = {"VOLKIN_CONTROLLER_METRICS_LISTEN": "0.0.0.0:0"}
    assert config.load(["--node-id", "c1"], environ).metrics_listen == "0.0.0.0:0"
    with pytest.raises(InvalidArgument, match="metrics_listen"):
        config.load(["--node-id", "c1", "--metrics-listen", "9470"], {})
