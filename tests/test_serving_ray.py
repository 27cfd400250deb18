"""`pio-fvlm serve --engine ray`: a real local Ray cluster and Ray Serve replica on 127.0.0.1 (started
by the test, stopped at its end), the shipped demo model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("ray.serve", reason="the ray engine needs the ray extra: pip install -e '.[ray]'")

from pio_fvlm.serving.client import ServerProcess, chat_body, post_chat  # noqa: E402
from test_serving import (  # noqa: E402
    BUDGET,
    assert_concurrent_requests_answered,
    assert_openai_client_plain_and_streaming,
    local_answer,
    scenes,
)

REPLICA = "ServeReplica:pio-fvlm:PrunedVLM"  # the replica actor's process title


@pytest.fixture(scope="module")
def ray_server():
    with ServerProcess(["--engine", "ray", "--budget", str(BUDGET)], startup_timeout=300) as running:
        yield running


def test_sixteen_concurrent_requests_all_answered_correctly_in_batches(ray_server, local):
    headers = assert_concurrent_requests_answered(ray_server.url, local, 16, seed=91)
    assert max(int(h["x-pio-fvlm-batch-size"]) for h in headers) > 1


def test_openai_client_plain_and_streaming(ray_server, local):
    assert_openai_client_plain_and_streaming(ray_server.url, local, seed=93)


def test_bad_requests_get_a_400_and_the_server_keeps_serving(ray_server, local):
    for body, words in ((b"{not json", "not JSON"), ({"messages": []}, "non-empty list"),
                        (chat_body("q", model="gpt-4o"), "pio-fvlm-demo")):
        status, _, reply = post_chat(ray_server.url, body)
        assert status == 400 and words in reply["detail"]
    image, qa = scenes(1, seed=95)[0]
    status, _, reply = post_chat(ray_server.url, chat_body(qa.question, image))
    assert status == 200 and reply["choices"][0]["message"]["content"].strip() == local_answer(
        local, image, qa.question)[0]


def _replica_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if REPLICA in line]


def test_a_killed_replica_is_replaced_and_requests_in_flight_fail_fast(ray_server, local):
    pids = _replica_pids()
    assert len(pids) == 1, pids
    asked = scenes(6, seed=97)
    with ThreadPoolExecutor(6) as pool:
        pending = [pool.submit(post_chat, ray_server.url, chat_body(qa.question, image), 60) for image, qa in asked]
        time.sleep(0.05)
        os.kill(pids[0], signal.SIGKILL)
        statuses = [future.result(timeout=90)[0] for future in pending]  # never a hang
    assert all(status == 200 or status >= 500 for status in statuses), statuses
    image, qa = asked[0]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status, _, reply = post_chat(ray_server.url, chat_body(qa.question, image), timeout=30)
        if status == 200:
            break
        time.sleep(1)
    assert status == 200, ray_server.output()[-3000:]
    assert reply["choices"][0]["message"]["content"].strip() == local_answer(local, image, qa.question)[0]
    assert _replica_pids() and _replica_pids() != pids


def test_bad_settings_exit_2_before_anything_is_deployed():
    done = subprocess.run([sys.executable, "-m", "pio_fvlm.cli", "serve", "--engine", "ray", "--layer", "99"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "layer=99 is out of range" in done.stderr, done.stderr
    assert "Started a local Ray instance" not in done.stderr


def test_ray_flags_need_the_ray_engine():
    done = subprocess.run([sys.executable, "-m", "pio_fvlm.cli", "serve", "--engine", "local", "--replicas", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--replicas need --engine ray" in done.stderr


def test_replica_resources_reach_ray_serve():
    from pio_fvlm.serving.ray_engine import deployment

    app = deployment("pio-fvlm-demo", {}, device="cpu", dtype="auto", attn_implementation=None, max_batch_size=4,
                     batch_wait_ms=5, replicas=3, num_gpus_per_replica=0.5, num_cpus_per_replica=2)
    options = app._bound_deployment  # Ray's own record of the deployment's settings
    assert options.num_replicas == 3
    assert options.ray_actor_options["num_cpus"] == 2 and options.ray_actor_options["num_gpus"] == 0.5


@pytest.mark.parametrize("args, message", [(["--engine", "local", "--num-cpus-per-replica", "2"],
                                            "--num-cpus-per-replica need --engine ray"),
                                           (["--num-cpus-per-replica", "-1"], "must be >= 0")])
def test_replica_cpus_are_checked(args, message):
    done = subprocess.run([sys.executable, "-m", "pio_fvlm.cli", "serve", *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def parsed_engine(argv: list[str], capsys) -> tuple[str, str]:
    """The engine ``pio-fvlm serve ARGV`` runs on, and what it said about it."""
    import argparse

    from pio_fvlm.serving import commands

    p = argparse.ArgumentParser()
    commands._add_model_options(p)
    p.add_argument("--replicas", type=int)
    args = p.parse_args(argv)
    engine = commands._engine(args, p, {"--replicas": args.replicas}, "serve")
    return engine, capsys.readouterr().err


def test_ray_is_the_default_engine_when_installed_and_local_otherwise(capsys, monkeypatch):
    assert parsed_engine([], capsys) == ("ray", "")
    assert parsed_engine(["--engine", "local"], capsys) == ("local", "")
    monkeypatch.setattr("pio_fvlm.serving.ray_engine.ray_available", lambda: False)
    engine, said = parsed_engine([], capsys)
    assert engine == "local" and "Ray is not installed" in said
    with pytest.raises(SystemExit):
        parsed_engine(["--replicas", "2"], capsys)
    assert "--engine ray needs Ray" in capsys.readouterr().err
