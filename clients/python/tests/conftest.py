"""Real servers for the tests: a nats-server with JetStream on a free loopback port, authorization on as
`scripts/run` deploys it (`taskpods auth init`), and the `taskpods` engine (the built binary, local
backend: tasks run under bubblewrap). Nothing is mocked.

Binaries: NATS_SERVER_BIN (default `nats-server` on PATH), TASKPODS_BIN and TASKPODS_AGENT_BIN (default
the debug builds in the workspace's target dir; scripts/test builds them).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats
import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "clients" / "python"))

TARGET = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
TASKPODS_BIN = os.environ.get("TASKPODS_BIN", str(TARGET / "debug" / "taskpods"))
AGENT_BIN = os.environ.get("TASKPODS_AGENT_BIN", str(TARGET / "debug" / "taskpods-agent"))
NATS_SERVER_BIN = os.environ.get("NATS_SERVER_BIN", "nats-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Installation:
    """A nats-server and an engine for the test session."""

    def __init__(self, root: Path):
        self.dir = root
        self.auth = root / "auth"
        port = free_port()
        self.url = f"nats://127.0.0.1:{port}"
        subprocess.run([TASKPODS_BIN, "auth", "init", str(self.auth)], check=True, capture_output=True)
        conf = root / "nats.conf"
        conf.write_text(
            f'listen: 127.0.0.1:{port}\njetstream {{ store_dir: "{root / "nats"}" }}\ninclude "auth/nats-auth.conf"\n'
        )
        self.nats = subprocess.Popen([NATS_SERVER_BIN, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.engine_log = root / "engine.log"
        env = {**os.environ, "TASKPODS_AGENT_BIN": AGENT_BIN, "TASKPODS_DATA": str(root / "data"), "RUST_LOG": "warn"}
        args = [TASKPODS_BIN, "serve", "--nats-url", self.url, "--backend", "local", "--no-ui"]
        args += ["--creds", self.creds("engine"), "--task-signer", str(self.auth / "task-signer.nk")]
        args += ["--seal-key", str(self.auth / "seal.key")]
        with open(self.engine_log, "wb") as log:
            self.engine = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log)
        self._wait_ready()

    def creds(self, role: str) -> str:
        return str(self.auth / f"{role}.creds")

    def _wait_ready(self) -> None:
        """Ready when the views exist and the engine pulls commands (asked as admin)."""
        asyncio.run(self._ready())

    async def _ready(self) -> None:
        deadline = time.monotonic() + 60
        last: object = None
        while time.monotonic() < deadline:
            if self.engine.poll() is not None:
                raise RuntimeError(f"the engine exited: {self.engine_log.read_text()}")
            try:
                nc = await nats.connect(self.url, user_credentials=self.creds("admin"), allow_reconnect=False)
                try:
                    jsm = nc.jsm()
                    await jsm.stream_info("KV_taskpods_tasks")
                    if (await jsm.consumers_info("TASKPODS_CMD")):
                        return
                finally:
                    await nc.close()
            except Exception as e:  # not up yet
                last = e
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the engine did not start: {last}\n{self.engine_log.read_text()}")

    def stop(self) -> None:
        for proc in (self.engine, self.nats):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="session")
def inst():
    with tempfile.TemporaryDirectory(prefix="taskpods-py-") as root:
        installation = Installation(Path(root))
        try:
            yield installation
        finally:
            installation.stop()
