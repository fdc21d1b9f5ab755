"""What the CLI prints under awkward conditions: pipes that close, terminals that cannot show ✓, bad -n
values, absurd names, and --json output that must stay parseable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from stigmer.paths import Paths
from tests.conftest import run_cli, stigmer_exe


def _log(paths: Paths, lines: int) -> None:
    paths.logs_dir.mkdir(parents=True)
    paths.log_file("llm").write_text("".join(f"line {i}\n" for i in range(lines)))


def test_logs_line_counts(isolated_home: Paths) -> None:
    _log(isolated_home, 200_000)  # more than one read-back block
    r = run_cli("server", "logs", "-n", "3")
    assert r.stdout.splitlines() == ["line 199997", "line 199998", "line 199999"]
    r = run_cli("server", "logs", "-n", "5000")
    assert len(r.stdout.splitlines()) == 5000 and r.stdout.splitlines()[0] == "line 195000"
    r = run_cli("server", "logs", "-n", "0")
    assert r.returncode == 0 and r.stdout == ""  # as tail -n 0: nothing
    for bad in ("-5", "x", "99999999"):
        r = run_cli("server", "logs", "-n", bad)
        assert r.returncode == 2 and "usage:" in r.stderr and r.stdout == ""


def test_closed_pipe_ends_quietly(isolated_home: Paths) -> None:
    _log(isolated_home, 100_000)
    env = dict(os.environ)
    cmd = [*stigmer_exe(), "server", "logs", "-n", "100000"]
    producer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert producer.stdout is not None
    first = producer.stdout.readline()
    producer.stdout.close()  # what `| head -1` does
    _out, err = producer.communicate(timeout=30)
    assert first == b"line 0\n"
    assert producer.returncode == 0 and err == b""


def test_ascii_terminal_gets_ascii_markers(isolated_home: Paths) -> None:
    r = run_cli("server", "llm", "status", env={"PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0, r.stderr
    assert "[x] Not Running" in r.stdout and "bug in Stigmer" not in r.stderr
    r = run_cli("config", "set", "llm.model", "llama3.2", env={"PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0 and r.stdout.startswith("[ok] Configuration updated")


def test_absurdly_long_model_name_says_too_long(isolated_home: Paths) -> None:
    name = "m" * 5000
    for args in (("server", "llm", "pull", name), ("config", "set", "llm.model", name)):
        r = run_cli(*args)
        assert r.returncode in (2, 3) and "too long" in r.stderr
        assert len(r.stderr) < 1000  # the name is not echoed whole (the bug: 10 KB, twice)


def test_status_json_is_clean_on_stdout(isolated_home: Paths) -> None:
    r = run_cli("server", "llm", "status", "--json")
    data = json.loads(r.stdout)  # nothing but the document on stdout
    assert data["running"] is False and data["provider"] == "ollama"


def test_relative_stigmer_home_is_made_absolute(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    env = {**os.environ, "STIGMER_HOME": "rel-home"}
    subprocess.run(
        [*stigmer_exe(), "config", "set", "llm.model", "llama3.2"], cwd=tmp_path / "a", env=env, check=True
    )
    path = subprocess.run(
        [*stigmer_exe(), "config", "path"], cwd=tmp_path / "b", env=env, capture_output=True, text=True
    )
    assert path.stdout.strip() == str(tmp_path / "b" / "rel-home" / "config.yaml")  # absolute
    assert Paths.from_env({"STIGMER_HOME": "rel-home"}).home.is_absolute()


def test_status_stays_light(isolated_home: Paths) -> None:
    # What keeps `stigmer server status` fast: with no server, no HTTP client, YAML parser or
    # providers; never temporalio (the CLI talks to the daemon over HTTP).
    code = (
        "import sys\n"
        "from stigmer.cli.main import main\n"
        "try:\n"
        "    main(['server', 'status'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('http.client', 'ruamel.yaml', 'temporalio', 'stigmer.llm.provider', 'stigmer.config.store')\n"
        "print(sorted(m for m in heavy if m in sys.modules), file=sys.stderr)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=dict(os.environ)
    )
    assert r.stderr.strip().splitlines()[-1] == "[]", r.stderr
    assert "Stopped" in r.stdout


LLM_STATUS_HEAVY = (
    "http.client", "urllib.request", "ruamel.yaml", "temporalio", "psutil", "socket", "encodings.idna",
    "stigmer.config.store", "stigmer.config.schema", "stigmer.llm.provider", "stigmer.net.http",
    "stigmer.llm.ollama.provider", "stigmer.llm.llamacpp.provider", "stigmer.services.manager",
    "stigmer.server.control", "stigmer.server.client", "subprocess",
)  # fmt: skip


def _llm_status_modules(env: dict[str, str]) -> tuple[list[str], str]:
    code = (
        "import sys\n"
        "from stigmer.cli.main import main\n"
        "main(['server', 'llm', 'status'])\n"
        f"print(sorted(m for m in {LLM_STATUS_HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    return eval(r.stderr.strip().splitlines()[-1]), r.stdout  # a list literal printed just above


def test_llm_status_stays_light(isolated_home: Paths) -> None:
    # `stigmer server llm status` with nothing running (its 100 ms budget, issue 14): no settings
    # schema, YAML parser, provider, HTTP client or psutil; a few files and one refused connect.
    from tests.doubles.archives import free_port

    env = {**os.environ, "STIGMER_LLM_BASE_URL": f"http://127.0.0.1:{free_port()}"}
    isolated_home.ensure_home()  # as after a first start (before it, a status writes nothing)
    heavy, out = _llm_status_modules(env)  # the runtime, no machine choice yet: the provider chooses it
    assert "stigmer.llm.ollama.provider" in heavy and "Model:    qwen2.5-coder:" in out
    assert (isolated_home.data_dir / "default-model.json").exists()
    heavy, out = _llm_status_modules(env)  # the choice is remembered: read from its file
    assert heavy == [] and "Chosen for this machine" in out and "tokens/s here" in out
    # a server ran and stopped: its state and token stay, its pid records are gone
    isolated_home.ensure(isolated_home.run_dir)
    (isolated_home.run_dir / "state.json").write_text('{"phase": "stopped"}')
    (isolated_home.home / "api.token").write_text("token")
    assert _llm_status_modules(env)[0] == []

    run_cli("config", "set", "llm.provider", "llamacpp")  # a config file, the built-in engine
    run_cli("config", "set", "llm.base_url", env["STIGMER_LLM_BASE_URL"])
    heavy, out = _llm_status_modules({k: v for k, v in env.items() if k != "STIGMER_LLM_BASE_URL"})
    assert heavy == [] and "Local (built-in engine)" in out and "Not Running" in out
