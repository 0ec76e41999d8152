"""The taskpods client for Brains written in Python (nats-py): launch, read, follow and cancel tasks over
NATS exactly as docs/PROTOCOL.md describes (commands as JSON on the command stream, events in msgpack on
the event stream, views as JSON in KV). The TypeScript (clients/typescript) and Rust (client/) clients
are the other implementations of that page; this one is small: launch, get, events, wait, logs, cancel.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

import msgpack
import nats
from nats.errors import Error as NatsError
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

__all__ = ["Launched", "LogChunk", "TaskpodsClient", "TaskpodsError", "task_id_from_idempotency_key"]

#: The namespace of ids derived from idempotency keys (docs/PROTOCOL.md, "Which task").
IDEMPOTENCY_NAMESPACE = uuid.UUID("6c1f3a2e-9b7d-4e55-8a10-7a5f2c3d9e01")

#: Where `scripts/run` writes the Brain's credentials (used when neither `creds` nor TASKPODS_CREDS says).
DEFAULT_CREDS = "~/.local/share/taskpods/auth/brain.creds"

TERMINAL = {"rejected", "succeeded", "failed", "timed_out", "cancelled"}


def task_id_from_idempotency_key(key: str) -> str:
    """The task id of an idempotency key: the same key always names the same task (UUIDv5)."""
    return str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, key))


class TaskpodsError(Exception):
    """Every failure of the client. `kind` is one of: rejected (the launch was invalid, `problems` says
    why), refused (unknown task, already ended, already cancelling), invalid (the engine could not read
    the command), credentials (the creds file cannot be read), unauthorized (NATS refused the identity),
    unreachable, timed_out."""

    def __init__(self, kind: str, message: str, task_id: Optional[str] = None, problems: Optional[list] = None):
        super().__init__(message)
        self.kind = kind
        self.task_id = task_id
        self.problems = problems or []


@dataclass
class Launched:
    """The answer to a launch."""

    task_id: str
    #: Its state when the engine answered (`{"state": "accepted"}`, …).
    state: dict
    #: Stream sequence of its first event: `get(task_id, at_least=sequence)` reads your write.
    sequence: int
    #: False when the launch found an existing task (same id or idempotency key).
    created: bool


@dataclass
class LogChunk:
    """One piece of a task's output: `stdout`, `stderr`, `truncated` (the cap was reached) or `end`."""

    kind: str
    seq: int
    data: bytes


def _applied(reply: dict) -> Launched:
    outcome = reply.get("outcome")
    if outcome == "applied":
        return Launched(reply["task_id"], reply["state"], reply["sequence"], reply["created"])
    if outcome == "rejected":
        problems = reply.get("problems", [])
        text = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        raise TaskpodsError("rejected", f"task {reply['task_id']} rejected: {text}", reply["task_id"], problems)
    if outcome == "refused":
        raise TaskpodsError("refused", f"task {reply['task_id']}: {reply.get('reason')}", reply["task_id"])
    raise TaskpodsError("invalid", f"the engine could not read the command: {reply.get('error')}")


class TaskpodsClient:
    """A connection to a taskpods installation, as the Brain identity."""

    def __init__(self, nc: nats.NATS, prefix: str = "taskpods", reply_timeout: float = 10.0):
        self.nc = nc
        self.js = nc.jetstream()
        self.prefix = prefix
        self.reply_timeout = reply_timeout
        stem = prefix.replace(".", "_")
        self._event_stream = f"{stem.upper()}_EVT"
        self._log_stream = f"{stem.upper()}_LOG"
        self._bucket_stem = stem

    @classmethod
    async def connect(
        cls,
        servers: str = "nats://127.0.0.1:4222",
        *,
        creds: Optional[str] = None,
        prefix: str = "taskpods",
        reply_timeout: float = 10.0,
    ) -> "TaskpodsClient":
        """Connects with the Brain's credentials: `creds` (a `.creds` file, `~/` is the home directory),
        else the file TASKPODS_CREDS names, else where `scripts/run` writes it. Fails with `credentials`
        when the file cannot be read, `unauthorized` when NATS refuses the identity."""
        path = os.path.expanduser(creds or os.environ.get("TASKPODS_CREDS") or DEFAULT_CREDS)
        if not os.path.isfile(path):
            raise TaskpodsError("credentials", f"cannot read the NATS credentials {path}: no such file")
        errors: list[Exception] = []

        async def record(e: Exception) -> None:
            errors.append(e)

        try:
            nc = await nats.connect(
                servers, user_credentials=path, allow_reconnect=False, max_reconnect_attempts=0, error_cb=record
            )
        except Exception as e:  # nats-py raises several types here; the server's words are in them
            said = " ".join(str(x) for x in [e, *errors])
            if "authorization violation" in said.lower():
                raise TaskpodsError(
                    "unauthorized",
                    f"NATS at {servers} refused the connection: it does not accept the credentials {path} "
                    "(another installation's, or revoked?)",
                ) from e
            raise TaskpodsError("unreachable", f"cannot reach NATS at {servers}: {said}") from e
        return cls(nc, prefix, reply_timeout)

    async def close(self) -> None:
        await self.nc.close()

    async def _command(self, subject: str, msg_id: str, body: dict) -> Optional[dict]:
        """Publishes a JSON command with a reply inbox; None when it was a duplicate or nobody answered."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, max_msgs=1)
        try:
            headers = {"Content-Type": "application/json", "Nats-Msg-Id": msg_id, "Taskpods-Reply-To": inbox}
            try:
                ack = await self.js.publish(subject, json.dumps(body).encode(), headers=headers)
            except NatsError as e:
                raise TaskpodsError("unreachable", f"publishing to {subject}: {e}") from e
            if ack.duplicate:
                return None
            try:
                reply = await sub.next_msg(timeout=self.reply_timeout)
            except nats.errors.TimeoutError:
                return None
            return json.loads(reply.data)
        finally:
            await sub.unsubscribe()

    async def launch(self, **launch: Any) -> Launched:
        """Launches a task (`script` or `goal`, `timeout_secs`, `env`, `labels`, `requester`,
        `idempotency_key`, … as in docs/PROTOCOL.md), or finds the one it names already: retrying is safe."""
        task_id = launch.get("task_id")
        if task_id is None:
            key = launch.get("idempotency_key")
            task_id = task_id_from_idempotency_key(key) if key is not None else str(uuid.uuid4())
        body = {k: v for k, v in launch.items() if v is not None}
        body["task_id"] = task_id
        reply = await self._command(f"{self.prefix}.cmd.launch", f"launch:{task_id}", body)
        if reply is not None:
            launched = _applied(reply)
            if launched.state.get("state") != "rejected":
                return launched
        # A repeat (duplicate, or a rejected repeat): the task's first event has the answer.
        deadline = time.monotonic() + self.reply_timeout
        while True:
            first = await self._event_at(task_id, 1)
            if first is not None:
                sequence, event = first
                if event["kind"] == "rejected":
                    problems = event.get("problems", [])
                    text = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
                    raise TaskpodsError("rejected", f"task {task_id} rejected: {text}", task_id, problems)
                view = await self.get(task_id)
                state = {"state": view["state"]} if view else {"state": "accepted"}
                return Launched(task_id, state, sequence, False)
            if time.monotonic() > deadline:
                raise TaskpodsError("timed_out", f"no answer from the engine to launch {task_id}", task_id)
            await asyncio.sleep(0.05)

    async def _event_at(self, task_id: str, start: int) -> Optional[tuple[int, dict]]:
        try:
            m = await self.js.get_msg(
                self._event_stream, seq=start, subject=f"{self.prefix}.evt.{task_id}", next=True, direct=True
            )
        except NotFoundError:
            return None
        return m.seq, msgpack.unpackb(m.data)

    async def get(self, task_id: str, at_least: int = 0, timeout: Optional[float] = None) -> Optional[dict]:
        """The task's view (as UIs read it), or None for a task the views do not have. With `at_least`
        (e.g. `Launched.sequence`) waits until the view has folded that event."""
        kv = await self._view("tasks")
        deadline = time.monotonic() + (timeout if timeout is not None else self.reply_timeout)
        while True:
            try:
                entry = await kv.get(task_id)
                view = json.loads(entry.value) if entry.value else None
            except nats.js.errors.KeyNotFoundError:
                view = None
            if at_least == 0 or (view is not None and view["seq"] >= at_least):
                return view
            if time.monotonic() > deadline:
                raise TaskpodsError("timed_out", f"the view of {task_id} did not reach sequence {at_least}", task_id)
            await asyncio.sleep(0.025)

    async def _view(self, view: str):
        generation = 1
        try:
            meta = await self.js.key_value(f"{self._bucket_stem}_projections")
            pointer = await meta.get("current")
            if pointer.value:
                generation = json.loads(pointer.value)["generation"]
        except (NotFoundError, nats.js.errors.KeyNotFoundError, nats.js.errors.BucketNotFoundError):
            pass
        name = f"{self._bucket_stem}_{view}" + ("" if generation <= 1 else f"_g{generation}")
        return await self.js.key_value(name)

    async def _from_the_start(self, subject: str, stream: str):
        """An ordered consumer on `subject` of `stream`, from its first message, then live."""
        return await self.js.subscribe(subject, stream=stream, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)

    async def events(self, task_id: str, until_end: bool = False) -> AsyncIterator[tuple[int, dict]]:
        """The task's events (stream sequence, event) from the first, then live; with `until_end` it stops
        after the event that ends the task."""
        sub = await self._from_the_start(f"{self.prefix}.evt.{task_id}", self._event_stream)
        try:
            async for m in sub.messages:
                event = msgpack.unpackb(m.data)
                yield m.metadata.sequence.stream, event
                if until_end and event["kind"] in TERMINAL:
                    return
        finally:
            await sub.unsubscribe()

    async def wait(self, task_id: str, timeout: float = 1800.0) -> dict:
        """Follows the task until it ends; returns its view once it includes the end (state, exit_code,
        output_tail, result)."""

        async def ended() -> dict:
            async for sequence, event in self.events(task_id, until_end=True):
                if event["kind"] in TERMINAL:
                    view = await self.get(task_id, at_least=sequence)
                    if view is None:
                        raise TaskpodsError("unreachable", f"task {task_id} ended but has no view", task_id)
                    return view
            raise TaskpodsError("unreachable", f"the event subscription of {task_id} ended", task_id)

        try:
            return await asyncio.wait_for(ended(), timeout)
        except asyncio.TimeoutError as e:
            raise TaskpodsError("timed_out", f"task {task_id} did not end within {timeout} s", task_id) from e

    async def logs(self, task_id: str, quiet: float = 2.0) -> AsyncIterator[LogChunk]:
        """The task's output from the start, live, until the agent's `end` marker (or, for an agent killed
        before it wrote one, until the task has ended and no output came for `quiet` seconds)."""
        sub = await self._from_the_start(f"{self.prefix}.log.{task_id}", self._log_stream)
        try:
            while True:
                try:
                    m = await sub.next_msg(timeout=quiet)
                except nats.errors.TimeoutError:
                    last = await self._last_event(task_id)
                    if last is not None and (last["kind"] in TERMINAL or last["kind"] == "reaped"):
                        return
                    continue
                headers = m.headers or {}
                kind = headers.get("Taskpods-Log-Kind", "")
                if kind in ("stdout", "stderr", "truncated", "end"):
                    yield LogChunk(kind, int(headers.get("Taskpods-Log-Seq", "0")), m.data)
                if kind == "end":
                    return
        finally:
            await sub.unsubscribe()

    async def _last_event(self, task_id: str) -> Optional[dict]:
        try:
            m = await self.js.get_last_msg(self._event_stream, f"{self.prefix}.evt.{task_id}", direct=True)
        except NotFoundError:
            return None
        return msgpack.unpackb(m.data)

    async def cancel(self, task_id: str, reason: Optional[str] = None) -> dict:
        """Asks for the task to stop; returns its state after the request. Unknown, finished or already
        cancelling tasks raise a `refused` error."""
        body = {"task_id": task_id, "reason": reason}
        reply = await self._command(f"{self.prefix}.cmd.cancel.{task_id}", f"cancel:{task_id}:{uuid.uuid4()}", body)
        if reply is None:
            raise TaskpodsError("timed_out", f"no answer from the engine to the cancel of {task_id}", task_id)
        return _applied(reply).state
