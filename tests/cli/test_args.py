"""A wrong command line gets one readable line and exit code 2, and sends nothing."""

from importlib.metadata import entry_points

import pytest

from tests.support.etcd import free_port
from volkin.cli.__main__ import run
from volkin.cli.args import parse


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], code: int = 2,
           environ: dict[str, str] | None = None) -> str:
    assert run(argv, environ or {}) == code
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("volkin: "), err
    assert "Traceback" not in err
    return err.strip()


@pytest.mark.parametrize(("argv", "said"), [
    (["volume", "create", "v", "--size", "64MB"], "'64MB' is ambiguous"),
    (["volume", "create", "v", "--size", "lots"], "'lots' is not a size"),
    (["volume", "create", "v"], "required: --size"),
    (["volume", "create", "v", "--size", "1GiB", "--block-size", "4kb"],
     "block size '4kb' is ambiguous"),
    (["volume", "create", "v", "--size", "1GiB", "--block-size", "0"],
     "block size 0 must be a power of two from 4KiB to 16MiB"),
    (["volume", "create", "v", "--size", "1GiB", "--block-size", "1536"], "power of two"),
    (["volume", "create", "v", "--size", "1GiB", "--block-size", "64MiB"], "power of two"),
    (["volume"], "volume: the following arguments are required: COMMAND"),
    ([], "required: COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["refresh", "V2"], "required: --from"),
    (["refresh", "V2", "--from", "V1", "--rate", "quick"], "rate 'quick' is not a size"),
    (["job", "wait"], "required: id"),
    (["volume", "list", "-o", "yaml"], "invalid choice: 'yaml'"),
    (["volume", "list", "--bogus"], "unrecognized arguments: --bogus"),
    (["dev", "up"], "required: --dir"),
    (["dev", "up", "--dir", "d", "--agents", "0"], "'0' must be at least 1"),
    (["dev", "down", "--dir", "d", "--timeout", "soon"], "'soon' is not a number of seconds"),
])
def test_a_wrong_command_line_is_one_line_and_exit_code_2(
        argv: list[str], said: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = _fails(argv, capsys, environ={"VOLKIN_CONTROLLER": "127.0.0.1:1"})
    assert said in err
    assert "--help" in err


def test_without_a_controller_address_it_says_where_to_get_one(
        capsys: pytest.CaptureFixture[str]) -> None:
    err = _fails(["volume", "list"], capsys)
    assert "--controller" in err and "VOLKIN_CONTROLLER" in err and "dev up" in err


@pytest.mark.parametrize("address", ["localhost", "host:port", ":7470", "h:99999"])
def test_a_controller_address_must_be_host_and_port(
        address: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert "is not host:port" in _fails(["volume", "list", "--controller", address], capsys)


def test_an_unreachable_controller_is_named_and_exit_code_1(
        capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{free_port()}"
    err = _fails(["job", "list"], capsys, code=1, environ={"VOLKIN_CONTROLLER": address})
    assert f"cannot reach the controller at {address}" in err


def test_global_flags_work_before_and_after_the_command() -> None:
    before = parse(["--controller", "h:1", "-o", "json", "volume", "list"])
    after = parse(["volume", "list", "--controller", "h:1", "-o", "json"])
    assert (before.controller, before.output) == (after.controller, after.output) == ("h:1",
                                                                                      "json")
    default = parse(["volume", "list"])
    assert (default.controller, default.output) == (None, "table")


def test_the_flag_wins_over_the_environment() -> None:
    from volkin.cli.client import controller_address

    assert controller_address("a:1", {"VOLKIN_CONTROLLER": "b:2"}) == "a:1"
    assert controller_address(None, {"VOLKIN_CONTROLLER": "b:2"}) == "b:2"


def test_sizes_and_rates_arrive_in_bytes() -> None:
    args = parse(["volume", "create", "v", "--size", "1GiB", "--block-size", "64KiB"])
    assert (args.size, args.block_size, args.command) == (1 << 30, 65536, "volume.create")
    args = parse(["refresh", "V2", "--from", "V1", "--rate", "16MiB/s", "--wait"])
    assert (args.target, args.source, args.rate, args.wait) == ("V2", "V1", 16 << 20, True)


def test_volkin_is_an_installed_console_script() -> None:
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("volkin") == "volkin.cli.__main__:main"
