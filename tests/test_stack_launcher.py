"""``ssjf up``'s local stack without starting its services: the interfaces they are told to
bind, and what the banner says. The whole stack for real: tests/test_stack_e2e.py."""

from __future__ import annotations

import argparse
import signal
from types import SimpleNamespace

import pytest

from services.cli import build_parser
from services.stack import launcher
from services.stack.cli import _run_up, up_config
from services.stack.launcher import LocalStack, StackConfig, _Child


def _hosts(args: list[str]) -> list[str]:
    return [args[index + 1] for index, arg in enumerate(args) if arg == "--host"]


def test_every_service_of_a_local_stack_binds_loopback_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`make run` has no auth and no TLS: no service, the HTTP front included (whose own
    --host default is every interface), may listen beyond 127.0.0.1."""
    spawned: dict[str, list[str]] = {}

    def spawn(
        self: LocalStack, name: str, port: int, args: list[str], env: dict | None = None
    ) -> _Child:
        spawned[name] = args
        running = SimpleNamespace(poll=lambda: None)
        return _Child(name, f"127.0.0.1:{port}", running, None)  # type: ignore[arg-type]

    monkeypatch.setattr(LocalStack, "_spawn", spawn)
    monkeypatch.setattr(launcher, "wait_for_serving", lambda *args, **kwargs: None)
    monkeypatch.setattr(launcher, "wait_for_http", lambda *args, **kwargs: None)
    config = StackConfig(port=0, workers=2, redis_url="redis://unused", http_port=0)
    LocalStack(config).start()
    assert set(spawned) == {"predictor", "scheduler", "worker-0", "worker-1", "http"}
    for name, args in spawned.items():
        assert _hosts(args) == ["127.0.0.1"], (name, args)


class _StartedStack:
    """Stands in for LocalStack in `ssjf up`: "started" at once, then "a service exited"."""

    def __init__(self, config: StackConfig) -> None:
        self.address = f"127.0.0.1:{config.port}"
        self.redis_url = "redis://127.0.0.1:6379/0"
        self.http_url = f"http://127.0.0.1:{config.http_port}/v1"

    def __enter__(self) -> _StartedStack:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def alive(self) -> bool:
        return False


def test_ssjf_up_says_that_auth_is_off_and_where_it_listens(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(launcher, "LocalStack", _StartedStack)
    # `ssjf up` installs its own SIGINT/SIGTERM handlers: not in the test runner.
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    args: argparse.Namespace = build_parser().parse_args(["up", "--http-port", "8123"])
    assert _run_up(args) == 1  # the stand-in's services "exited" after the banner
    printed = capsys.readouterr().out
    assert "Auth is off: every service listens on 127.0.0.1 only" in printed
    assert "http://127.0.0.1:8123/v1" in printed


def test_ssjf_up_serves_another_predictor_artifact_and_its_first_stage(tmp_path) -> None:
    parser = build_parser()
    default = up_config(parser.parse_args(["up"]))
    assert default.predictor_args == []  # the shipped artifact, the scheduler's own first stage
    assert "--first-stage" not in default.scheduler_args
    artifact = tmp_path / "probe"
    artifact.mkdir()
    (artifact / "metadata.json").write_text("{}")
    without_first_stage = up_config(
        parser.parse_args(["up", "--predictor-artifact", str(artifact)])
    )
    assert without_first_stage.predictor_args == ["--artifact", str(artifact)]
    assert "--first-stage" not in without_first_stage.scheduler_args
    (artifact / "first_stage.npz").write_bytes(b"")
    config = up_config(parser.parse_args(["up", "--predictor-artifact", str(artifact)]))
    first_stage = config.scheduler_args[config.scheduler_args.index("--first-stage") + 1]
    assert first_stage == str(artifact / "first_stage.npz")
    with pytest.raises(SystemExit, match=r"no metadata\.json"):
        up_config(parser.parse_args(["up", "--predictor-artifact", str(tmp_path / "missing")]))
