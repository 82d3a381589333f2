"""The instance manager and its ``ollama-pool`` commands, on real processes.

Every instance is an ``ollama-pool-standin serve`` process (or a small script
that runs the stand-in) started through the CLI on free ports of 127.0.0.1.
State, logs and models live in tmp_path. The `pool_dirs` fixture stops whatever
a test left recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from click.testing import CliRunner, Result

from ollama_pool import load_config
from ollama_pool._manager import (
    InstanceManager,
    InstanceRecord,
    NoInstancesRecordedError,
    follow_log,
)
from ollama_pool.cli import main

pytestmark = pytest.mark.timeout(120)

STANDIN = Path(sys.executable).with_name("ollama-pool-standin")


@dataclass
class PoolDirs:
    state_dir: Path
    log_dir: Path
    models_dir: Path

    def options(self) -> list[str]:
        return ["--state-dir", str(self.state_dir), "--log-dir", str(self.log_dir)]

    def manager(self) -> InstanceManager:
        return InstanceManager(self.state_dir, log_dir=self.log_dir)


def free_ports(count: int) -> int:
    """Return the first of `count` consecutive ports that are free on 127.0.0.1."""
    for _ in range(200):
        first = random.randint(20000, 60000 - count)
        if all(_port_is_free(port) for port in range(first, first + count)):
            return first
    raise RuntimeError(f"found no {count} consecutive free ports")


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _standin_children() -> list[psutil.Process]:
    children = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.status() != psutil.STATUS_ZOMBIE and any(
                "standin" in part or part.endswith("/ollama")
                for part in child.cmdline()
            ):
                children.append(child)
    return children


def _pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _tags(port: int) -> list[str]:
    response = httpx.get(f"http://127.0.0.1:{port}/api/tags", trust_env=False)
    response.raise_for_status()
    return [model["name"] for model in response.json()["models"]]


@pytest.fixture
def pool_dirs(tmp_path: Path) -> Iterator[PoolDirs]:
    dirs = PoolDirs(tmp_path / "state", tmp_path / "logs", tmp_path / "models")
    try:
        yield dirs
    finally:
        with contextlib.suppress(NoInstancesRecordedError):
            dirs.manager().stop(grace=5.0)
        for child in _standin_children():
            child.kill()


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(
        env={"OLLAMA_POOL_OLLAMA_BIN": str(STANDIN), "OLLAMA_MODELS": None}
    )


def invoke(runner: CliRunner, dirs: PoolDirs, *args: str) -> Result:
    return runner.invoke(main, [*args, *dirs.options()], catch_exceptions=False)


def start(
    runner: CliRunner, dirs: PoolDirs, count: int, port: int, *extra: str
) -> Result:
    return invoke(
        runner,
        dirs,
        "start",
        str(count),
        "--port",
        str(port),
        "--models-dir",
        str(dirs.models_dir),
        *extra,
    )


def status_rows(runner: CliRunner, dirs: PoolDirs) -> list[dict[str, object]]:
    result = invoke(runner, dirs, "status", "--json")
    assert result.exit_code == 0, result.output
    rows: list[dict[str, object]] = json.loads(result.output)
    return rows


def write_script(path: Path, body: str) -> Path:
    """Write an executable Python script that replaces the ollama binary."""
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


# A stand-in whose /api/pull accepts only two models, so others fail in the stream.
PULL_LIMITED_SERVER = """\
import os, signal
from ollama_pool.testing import Behavior, StandInServer

host, _, port = os.environ["OLLAMA_HOST"].rpartition(":")
server = StandInServer(
    int(port),
    host,
    Behavior(pullable=["llama3.2", "llama3.2:1b"]),
    os.environ["OLLAMA_MODELS"],
)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
server.start()
signal.sigwait({signal.SIGTERM, signal.SIGINT})
server.stop()
"""


# -- the whole life cycle ----------------------------------------------------


CONFIG_WITH_OTHER_KEYS = """\
llm:
  ollama:
    base_url: http://127.0.0.1:9
    model: llama3.2
    temperature: 0.1
    multiple_instances:
      enabled: false
      load_balancing: least_active
      instances:
        - base_url: http://127.0.0.1:9
          model: old
performance:
  num_workers: 3
"""


def test_fleet_life_cycle(
    runner: CliRunner, pool_dirs: PoolDirs, tmp_path: Path
) -> None:
    port = free_ports(4)
    ports = list(range(port, port + 4))
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG_WITH_OTHER_KEYS)

    # Start 4 and write them into an existing config.
    result = start(
        runner, pool_dirs, 4, port, "--model", "llama3.2", "--write-config", str(config)
    )
    assert result.exit_code == 0, result.output
    records = pool_dirs.manager().instances()
    assert [record.port for record in records] == ports
    for record in records:
        assert f"port {record.port}: PID {record.pid}" in result.output
    data = yaml.safe_load(config.read_text())
    multi = data["llm"]["ollama"]["multiple_instances"]
    assert multi["enabled"] is True
    assert multi["load_balancing"] == "least_active"
    assert multi["instances"] == [
        {"base_url": f"http://127.0.0.1:{p}", "model": "llama3.2"} for p in ports
    ]
    assert data["llm"]["ollama"]["temperature"] == 0.1
    assert data["llm"]["ollama"]["base_url"] == "http://127.0.0.1:9"
    assert data["performance"] == {"num_workers": 3}
    assert len(load_config(config).instances) == 4

    # Status shows 4 up.
    rows = status_rows(runner, pool_dirs)
    assert [row["state"] for row in rows] == ["up"] * 4
    assert all(row["version"] for row in rows)
    assert all(row["memory_bytes"] for row in rows)
    table = invoke(runner, pool_dirs, "status")
    assert table.exit_code == 0, table.output
    assert "4 of 4 instances up" in table.output

    # One pull into the shared folder; every instance lists the model.
    result = invoke(runner, pool_dirs, "pull", "tinyllama")
    assert result.exit_code == 0, result.output
    assert f"port {port}: pulling manifest" in result.output
    assert f"port {port}: downloading sha256:" in result.output
    assert f"port {port}: success" in result.output
    assert f"pulled once through port {port}" in result.output
    for instance_port in ports:
        assert "tinyllama:latest" in _tags(instance_port)
    rows = status_rows(runner, pool_dirs)
    assert all("tinyllama:latest" in row["models"] for row in rows)

    # An instance killed from outside shows as down, and a pull then fails.
    killed = records[1]
    os.kill(killed.pid, signal.SIGKILL)
    psutil.Process(killed.pid).wait(timeout=10)
    rows = status_rows(runner, pool_dirs)
    states = {row["port"]: row["state"] for row in rows}
    assert states[killed.port] == "down"
    assert [states[p] for p in ports if p != killed.port] == ["up"] * 3
    result = invoke(runner, pool_dirs, "pull", "llama3.2")
    assert result.exit_code != 0
    assert f"instance on port {killed.port}" in result.output
    assert "does not respond" in result.output

    # Stop one port, then the rest: no process is left.
    result = invoke(runner, pool_dirs, "stop", "--port", str(port + 3))
    assert result.exit_code == 0, result.output
    assert f"port {port + 3}: PID {records[3].pid} stopped" in result.output
    assert [r.port for r in pool_dirs.manager().instances()] == ports[:3]
    result = invoke(runner, pool_dirs, "stop")
    assert result.exit_code == 0, result.output
    assert f"port {killed.port}: PID {killed.pid} already exited" in result.output
    assert f"port {port}: PID {records[0].pid} stopped" in result.output
    for record in records:
        assert _pid_gone(record.pid), f"PID {record.pid} of port {record.port} alive"
    assert all(_port_is_free(p) for p in ports)
    assert pool_dirs.manager().instances() == []


def test_restart_replaces_processes(runner: CliRunner, pool_dirs: PoolDirs) -> None:
    port = free_ports(2)
    assert start(runner, pool_dirs, 1, port, "--gpus", "3,5").exit_code == 0
    old = pool_dirs.manager().instances()

    result = invoke(runner, pool_dirs, "restart", "2")

    assert result.exit_code == 0, result.output
    new = pool_dirs.manager().instances()
    assert [record.port for record in new] == [port, port + 1]
    assert new[0].pid != old[0].pid
    assert _pid_gone(old[0].pid)
    assert [row["state"] for row in status_rows(runner, pool_dirs)] == ["up"] * 2
    for offset, record in enumerate(new):
        env = psutil.Process(record.pid).environ()
        assert env["OLLAMA_HOST"] == f"127.0.0.1:{port + offset}"
        assert env["OLLAMA_MODELS"] == str(pool_dirs.models_dir.resolve())
        assert env["CUDA_VISIBLE_DEVICES"] == ["3", "5"][offset]


def test_stopped_process_is_unresponsive_then_killed(
    runner: CliRunner, pool_dirs: PoolDirs
) -> None:
    port = free_ports(2)
    assert start(runner, pool_dirs, 2, port).exit_code == 0
    frozen, running = pool_dirs.manager().instances()
    # A stopped process keeps its socket, so connections hang instead of failing,
    # and SIGTERM stays pending until SIGKILL ends it.
    os.kill(frozen.pid, signal.SIGSTOP)

    rows = status_rows(runner, pool_dirs)
    result = invoke(runner, pool_dirs, "stop", "--timeout", "1")

    assert [row["state"] for row in rows] == ["unresponsive", "up"]
    assert result.exit_code == 0, result.output
    assert f"port {port}: PID {frozen.pid} killed" in result.output
    assert f"port {port + 1}: PID {running.pid} stopped" in result.output
    assert _pid_gone(frozen.pid)
    assert _pid_gone(running.pid)


def test_console_script_start_status_stop(pool_dirs: PoolDirs) -> None:
    # The instances must not hold the pipes of the command, or run() would hang.
    command = Path(sys.executable).with_name("ollama-pool")
    env = {**os.environ, "OLLAMA_POOL_OLLAMA_BIN": str(STANDIN)}
    port = free_ports(1)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(command), *args, *pool_dirs.options()],
            capture_output=True,
            text=True,
            env=env,
            timeout=90,
            check=False,
        )

    started = run(
        "start", "1", "--port", str(port), "--models-dir", str(pool_dirs.models_dir)
    )
    assert started.returncode == 0, started.stderr
    record = pool_dirs.manager().instances()[0]
    status = run("status", "--json")
    stopped = run("stop")

    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)[0]["state"] == "up"
    assert stopped.returncode == 0, stopped.stderr
    assert f"port {port}: PID {record.pid} stopped" in stopped.stdout
    assert _pid_gone(record.pid)


# -- start failures -------------------------------------------------------------


def test_start_on_taken_port_starts_nothing(
    runner: CliRunner, pool_dirs: PoolDirs
) -> None:
    port = free_ports(3)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port + 1))
        holder.listen()

        result = start(runner, pool_dirs, 3, port)

    assert result.exit_code != 0
    assert f"port {port + 1}" in result.output
    assert f"PID {os.getpid()}" in result.output
    assert pool_dirs.manager().instances() == []
    assert _standin_children() == []
    assert _port_is_free(port)
    assert _port_is_free(port + 2)


def test_failed_instance_stops_the_others(
    runner: CliRunner, pool_dirs: PoolDirs, tmp_path: Path
) -> None:
    port = free_ports(2)
    failing_port = port + 1
    binary = write_script(
        tmp_path / "ollama",
        f"""\
        import os, sys
        if os.environ["OLLAMA_HOST"].endswith(":{failing_port}"):
            print("Error: listen tcp: simulated failure", flush=True)
            sys.exit(3)
        os.execv({str(STANDIN)!r}, [{str(STANDIN)!r}, "serve"])
        """,
    )

    result = start(runner, pool_dirs, 2, port, "--ollama-bin", str(binary))

    assert result.exit_code != 0
    assert f"port {failing_port} exited with code 3" in result.output
    assert f"ollama_{failing_port}.log" in result.output
    assert "simulated failure" in result.output
    assert pool_dirs.manager().instances() == []
    assert _standin_children() == []
    assert _port_is_free(port)


def test_missing_binary_is_reported(runner: CliRunner, pool_dirs: PoolDirs) -> None:
    port = free_ports(1)

    result = start(runner, pool_dirs, 1, port, "--ollama-bin", "/nonexistent/ollama")

    assert result.exit_code != 0
    assert "/nonexistent/ollama" in result.output
    assert "missing or not executable" in result.output
    assert pool_dirs.manager().instances() == []


def test_bad_config_fails_before_start(
    runner: CliRunner, pool_dirs: PoolDirs, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("llm:\n  ollama: just a string\n")
    port = free_ports(1)

    result = start(runner, pool_dirs, 1, port, "--write-config", str(config))

    assert result.exit_code != 0
    assert "llm.ollama" in result.output
    assert "expected a mapping" in result.output
    assert config.read_text() == "llm:\n  ollama: just a string\n"
    assert pool_dirs.manager().instances() == []


# -- commands on one running pair ---------------------------------------------


@pytest.fixture(scope="module")
def running_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoolDirs]:
    """Two instances for the tests that do not stop or kill them."""
    root = tmp_path_factory.mktemp("pair")
    dirs = PoolDirs(root / "state", root / "logs", root / "models")
    runner = CliRunner(env={"OLLAMA_POOL_OLLAMA_BIN": str(STANDIN)})
    try:
        result = start(runner, dirs, 2, free_ports(2))
        assert result.exit_code == 0, result.output
        yield dirs
    finally:
        with contextlib.suppress(NoInstancesRecordedError):
            dirs.manager().stop(grace=5.0)


def test_shell_metacharacters_stay_data(
    runner: CliRunner,
    running_pair: PoolDirs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A shell would create PWNED in the working directory. The name has no "/"
    # because an Ollama model name has at most a namespace before its name.
    monkeypatch.chdir(tmp_path)
    model = "x; touch PWNED && echo $(id) `id` | tee -a PWNED > PWNED"
    port = running_pair.manager().instances()[0].port

    pulled = invoke(runner, running_pair, "pull", model)
    tested = invoke(runner, running_pair, "test", str(port), model, "--prompt", "$(id)")

    assert pulled.exit_code == 0, pulled.output
    assert tested.exit_code == 0, tested.output
    assert not (tmp_path / "PWNED").exists()
    log = (running_pair.log_dir / f"ollama_{port}.log").read_text()
    assert f"pulled model {model}:latest" in log
    assert f"{model}:latest" in _tags(port)
    assert f"{model}:latest" in _tags(port + 1)
    assert "echo: $(id)" in tested.output


def test_test_command_streams_and_times(
    runner: CliRunner, running_pair: PoolDirs
) -> None:
    port = running_pair.manager().instances()[1].port

    reply = invoke(
        runner, running_pair, "test", str(port), "llama3.2", "--prompt", "hi"
    )
    missing = invoke(runner, running_pair, "test", str(port), "nope")
    no_server = invoke(runner, running_pair, "test", str(free_ports(1)), "llama3.2")

    assert reply.exit_code == 0, reply.output
    assert "echo: hi" in reply.output
    assert "time to first token:" in reply.output
    assert "tokens/s" in reply.output
    assert missing.exit_code != 0
    assert "'nope'" in missing.output
    assert "not found" in missing.output
    assert no_server.exit_code != 0
    assert "no Ollama server responds" in no_server.output


def test_logs_prints_last_lines(runner: CliRunner, running_pair: PoolDirs) -> None:
    port = running_pair.manager().instances()[0].port

    every = invoke(runner, running_pair, "logs", str(port), "-n", "1000")
    last = invoke(runner, running_pair, "logs", str(port), "-n", "1")

    assert every.exit_code == 0, every.output
    assert f"==> ollama-pool: {STANDIN} serve on 127.0.0.1:{port}" in every.output
    assert last.exit_code == 0, last.output
    assert last.output.count("\n") == 1
    assert every.output.endswith(last.output)


def test_host_with_password_is_not_shown(
    runner: CliRunner, running_pair: PoolDirs
) -> None:
    result = invoke(
        runner, running_pair, "test", "11434", "m", "--host", "user:s3cret@127.0.0.1"
    )

    assert result.exit_code != 0
    assert "invalid host" in result.output
    assert "s3cret" not in result.output


# -- pull through separate folders ----------------------------------------------


def test_pull_separate_folders(
    runner: CliRunner, pool_dirs: PoolDirs, tmp_path: Path
) -> None:
    binary = write_script(tmp_path / "ollama", PULL_LIMITED_SERVER)
    port = free_ports(2)
    folders = [tmp_path / "models-a", tmp_path / "models-b"]
    for offset, folder in enumerate(folders):
        result = invoke(
            runner,
            pool_dirs,
            "start",
            "1",
            "--port",
            str(port + offset),
            "--models-dir",
            str(folder),
            "--ollama-bin",
            str(binary),
        )
        assert result.exit_code == 0, result.output

    parallel = invoke(runner, pool_dirs, "pull", "llama3.2:1b", "--parallel")
    one_by_one = invoke(runner, pool_dirs, "pull", "llama3.2")
    failed = invoke(runner, pool_dirs, "pull", "no-such-model", "--parallel")
    failed_in_turn = invoke(runner, pool_dirs, "pull", "no-such-model")

    assert parallel.exit_code == 0, parallel.output
    assert f"pulled through ports {port}, {port + 1}" in parallel.output
    assert f"port {port}: success" in parallel.output
    assert f"port {port + 1}: success" in parallel.output
    for offset, folder in enumerate(folders):
        assert "llama3.2:1b" in _tags(port + offset)
        assert list(folder.rglob("1b")), f"no manifest in {folder}"
    assert one_by_one.exit_code == 0, one_by_one.output
    assert f"pulled through ports {port}, {port + 1}" in one_by_one.output
    assert failed.exit_code != 0
    assert "'no-such-model'" in failed.output
    assert f"port {port}: pull model manifest: file does not exist" in failed.output
    assert f"port {port + 1}: pull model manifest" in failed.output
    assert failed_in_turn.exit_code != 0
    assert f"port {port}: pull model manifest" in failed_in_turn.output
    assert f"port {port + 1}: pull model manifest" in failed_in_turn.output


# -- stop safety and cleanup ------------------------------------------------------


def test_stop_leaves_reused_pid_alone(runner: CliRunner, pool_dirs: PoolDirs) -> None:
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        process = psutil.Process(stranger.pid)
        record = InstanceRecord(
            port=free_ports(1),
            host="127.0.0.1",
            pid=stranger.pid,
            create_time=process.create_time() - 3600,
            cmdline=tuple(process.cmdline()),
            log_path=str(pool_dirs.log_dir / "ollama_1.log"),
            model="m",
            models_dir=None,
            gpu=None,
            started_at="2025-01-01T00:00:00+00:00",
        )
        pool_dirs.state_dir.mkdir(parents=True)
        state_file = pool_dirs.state_dir / "instances.json"
        state_file.write_text(json.dumps([record.to_json()]))

        result = invoke(runner, pool_dirs, "stop")

        assert result.exit_code == 0, result.output
        assert "PID reused" in result.output
        assert stranger.poll() is None
        assert pool_dirs.manager().instances() == []
    finally:
        stranger.kill()
        stranger.wait()


def test_commands_without_instances_fail(
    runner: CliRunner, pool_dirs: PoolDirs
) -> None:
    for command in (["status"], ["stop"], ["pull", "m"], ["restart"]):
        result = invoke(runner, pool_dirs, *command)
        assert result.exit_code != 0, command
        assert "no instances recorded" in result.output, command


def test_cleanup_forgets_exited_and_deletes_logs(
    runner: CliRunner, pool_dirs: PoolDirs
) -> None:
    port = free_ports(1)
    assert start(runner, pool_dirs, 1, port).exit_code == 0
    record = pool_dirs.manager().instances()[0]
    os.kill(record.pid, signal.SIGKILL)
    psutil.Process(record.pid).wait(timeout=10)
    stray_port = free_ports(1)
    (pool_dirs.log_dir / f"ollama_{stray_port}.log").write_text("old run\n")
    other = pool_dirs.log_dir / "notes.txt"
    other.write_text("not a log of ours\n")

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        busy_port = listener.getsockname()[1]
        busy_log = pool_dirs.log_dir / f"ollama_{busy_port}.log"
        busy_log.write_text("a server still writes here\n")

        result = invoke(runner, pool_dirs, "cleanup")

    assert result.exit_code == 0, result.output
    assert f"forgot exited instance on port {port}" in result.output
    assert pool_dirs.manager().instances() == []
    assert not (pool_dirs.log_dir / f"ollama_{port}.log").exists()
    assert not (pool_dirs.log_dir / f"ollama_{stray_port}.log").exists()
    assert busy_log.exists()
    assert other.exists()
    gone = invoke(runner, pool_dirs, "logs", str(port))
    assert gone.exit_code != 0
    assert f"no log for port {port}" in gone.output


def test_follow_log_yields_appended_lines(tmp_path: Path) -> None:
    path = tmp_path / "ollama_1.log"
    path.write_text("old line\n")
    stop = threading.Event()

    def write_lines() -> None:
        with path.open("a") as file:
            for number in range(1000):
                if stop.is_set():
                    return
                file.write(f"line {number}\n")
                file.flush()
                time.sleep(0.02)

    writer = threading.Thread(target=write_lines)
    writer.start()
    received: list[str] = []
    try:
        for line in follow_log(path, poll_interval=0.01, stop=stop):
            received.append(line)
            if len(received) == 3:
                break
    finally:
        stop.set()
        writer.join(timeout=10)

    first = int(received[0].removeprefix("line "))
    assert received == [f"line {first}", f"line {first + 1}", f"line {first + 2}"]
