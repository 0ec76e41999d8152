"""The Python client against a real nats-server and engine, connected as the Brain (authorization on)."""

from __future__ import annotations

import asyncio
import subprocess
import uuid

import pytest

from conftest import TASKPODS_BIN
from taskpods_client import TaskpodsClient, TaskpodsError, task_id_from_idempotency_key


def run(coro):
    return asyncio.run(coro)


async def brain(inst) -> TaskpodsClient:
    return await TaskpodsClient.connect(inst.url, creds=inst.creds("brain"))


def test_ids_from_idempotency_keys_match_the_engines():
    # The value the Rust and TypeScript ids tests pin.
    assert task_id_from_idempotency_key("brain-42/step-7") == "b93a59e2-5a88-5b05-a0d5-9b8f3e41016f"


def test_launch_follows_the_output_live_and_waits_for_the_outcome(inst):
    async def body():
        client = await brain(inst)
        try:
            key = f"py-{uuid.uuid4()}"
            launched = await client.launch(
                idempotency_key=key,
                script="echo one; echo two >&2; echo '{\"n\": 2}' > /tmp/result.json",
                timeout_secs=60,
                labels={"suite": "python"},
                requester="py-brain",
            )
            assert launched.task_id == task_id_from_idempotency_key(key)
            assert launched.created
            view = await client.get(launched.task_id, at_least=launched.sequence)
            assert view is not None and view["task"] == launched.task_id

            chunks = [c async for c in client.logs(launched.task_id)]
            assert b"".join(c.data for c in chunks if c.kind == "stdout") == b"one\n"
            assert b"".join(c.data for c in chunks if c.kind == "stderr") == b"two\n"
            assert chunks[-1].kind == "end"

            done = await client.wait(launched.task_id, timeout=60)
            assert (done["state"], done["exit_code"], done["result"]) == ("succeeded", 0, {"n": 2})
            kinds = [e["kind"] async for _, e in client.events(launched.task_id, until_end=True)]
            assert kinds[0] == "accepted" and kinds[-1] == "succeeded" and "running" in kinds

            again = await client.launch(idempotency_key=key, script="echo other", timeout_secs=60)
            assert (again.task_id, again.created) == (launched.task_id, False)
        finally:
            await client.close()

    run(body())


def test_an_invalid_launch_is_rejected_with_every_problem(inst):
    async def body():
        client = await brain(inst)
        try:
            with pytest.raises(TaskpodsError) as caught:
                await client.launch(script="echo", timeout_secs=99999, env={"bad name": "x"})
            assert caught.value.kind == "rejected"
            fields = {p["field"] for p in caught.value.problems}
            assert {"timeout_secs", "env.bad name"} <= fields, fields
        finally:
            await client.close()

    run(body())


def test_cancel_stops_a_running_task_and_a_second_cancel_is_refused(inst):
    async def body():
        client = await brain(inst)
        try:
            launched = await client.launch(script="echo up; sleep 60", timeout_secs=120)
            async for _, event in client.events(launched.task_id):
                if event["kind"] == "running":
                    break
            state = await client.cancel(launched.task_id, reason="not needed")
            assert state["state"] in ("cancelling", "cancelled")
            done = await client.wait(launched.task_id, timeout=60)
            assert done["state"] == "cancelled"
            with pytest.raises(TaskpodsError) as caught:
                await client.cancel(launched.task_id)
            assert caught.value.kind == "refused"
        finally:
            await client.close()

    run(body())


def test_missing_or_foreign_credentials_are_clear_errors(inst, tmp_path, monkeypatch):
    monkeypatch.delenv("TASKPODS_CREDS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(TaskpodsError) as missing:
        run(TaskpodsClient.connect(inst.url))
    assert missing.value.kind == "credentials"
    assert f"{tmp_path}/.local/share/taskpods/auth/brain.creds" in str(missing.value)

    other = tmp_path / "other-auth"
    subprocess.run([TASKPODS_BIN, "auth", "init", str(other)], check=True, capture_output=True)
    monkeypatch.setenv("TASKPODS_CREDS", str(other / "brain.creds"))
    with pytest.raises(TaskpodsError) as foreign:
        run(TaskpodsClient.connect(inst.url))
    assert foreign.value.kind == "unauthorized"
    assert "other-auth/brain.creds" in str(foreign.value)
