"""The serving engine in a process of its own (unmask serve's default).

The engine's Python (each step's model call, sample, commit and bookkeeping) and the
HTTP front's event loop then hold separate interpreters: neither waits for the other's
GIL, and a crash in a kernel ends the engine process with an error for the requests it
held, not the server. (vLLM's V1 engine core runs apart from its API server for the same
reasons.) The front keeps a weightless copy of the model (unmask.models.checkpoint.
skeleton) to check requests; the engine process loads the weights.

Messages on one pipe. To the engine: ("submit", id, settings, eos_ids), ("cancel", id), ("stop",).
From it: ("ready", None) or ("failed", why) once at start; then ("events", [(id, event),
...], steps) once per step, holding every event of that step (one wake-up of the front
per step, not one per request); ("stopped", None) after a drain, or ("dead", why) when
the engine's thread failed (the process then exits).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import multiprocessing
import os
import threading

from unmask.serving.engine import Job, QueueFull, Unavailable, check_admission


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """What the engine process loads and how it runs."""

    model_dir: str
    max_batch: int
    max_queue: int
    dtype: object = None  # a torch.dtype, or None for the checkpoint's own
    device: str | None = None
    # torch's CPU threads in the engine process. None: one fewer than torch's default (the
    # machine's cores), leaving a core to the HTTP front and its clients; on this 2-core
    # machine a second engine thread cost 20-25% of the 16-client throughput (README, Serving).
    threads: int | None = None


class EngineProcess:
    """Engine's interface (start, stop, submit, cancel, load) over a child process. The
    front counts the requests it has handed over, so a full queue is refused at once."""

    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self.jobs: dict[int, Job] = {}
        self.remote: dict[Job, int] = {}
        self.ids = itertools.count()
        self.lock, self.send_lock = threading.Lock(), threading.Lock()
        self.stopping = False
        self.closed = False  # the pipe to the child is closed or broken (guarded by send_lock)
        self.dead: str | None = None
        self.last_steps = 0  # model calls so far, as the engine last reported
        self.process = self.connection = self.reader = None

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")  # not fork: torch's threads and locks do not survive it
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_serve_engine, args=(child, self.spec), name="unmask-engine",
                                       daemon=True)
        self.process.start()
        child.close()
        try:
            kind, detail = self.connection.recv()
        except EOFError:
            self.process.join(timeout=5)
            kind, detail = "failed", f"it exited with code {self.process.exitcode}"
        if kind != "ready":
            self.closed, self.dead = True, f"the engine process did not start: {detail}"
            raise RuntimeError(self.dead)
        self.reader = threading.Thread(target=self._read, name="unmask-engine-reader", daemon=True)
        self.reader.start()

    def stop(self, timeout: float = 600) -> None:
        """Finish every request handed over, then end the process. A process that has not
        drained within `timeout` seconds is terminated. Later calls do nothing."""
        with self.lock:
            if self.stopping:
                return
            self.stopping = True
        self._send(("stop",))
        if self.reader is not None:
            self.reader.join(timeout)
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()

    @property
    def capacity(self) -> int:
        """The requests it holds at once, decoding and waiting."""
        return self.spec.max_batch + self.spec.max_queue

    def submit(self, *jobs: Job) -> None:
        """Hands the jobs (a request's choices) to the engine, all or none (QueueFull,
        Unavailable; a process gone midway: the ones sent are taken back)."""
        with self.lock:
            check_admission(self.stopping, self.dead, len(self.jobs), self.spec.max_batch, self.spec.max_queue,
                            adding=len(jobs))
            for job in jobs:
                remote = next(self.ids)
                if not self._send(("submit", remote, job.settings, job.eos_ids)):
                    for sent in jobs:
                        sent_remote = self.remote.pop(sent, None)
                        if sent_remote is not None:
                            self.jobs.pop(sent_remote, None)
                    raise Unavailable("the engine stopped: its process is gone")
                self.jobs[remote], self.remote[job] = job, remote

    def cancel(self, job: Job) -> None:
        """The client went away: the engine frees its rows at its next step (its place in
        the front's count at once)."""
        job.cancelled = True
        with self.lock:
            remote = self.remote.pop(job, None)
            if remote is not None:
                self.jobs.pop(remote, None)
                self._send(("cancel", remote))

    def load(self) -> dict:
        """Requests handed over and not finished, as decoding (up to max_batch) and
        waiting; steps as the engine last reported them (with its events)."""
        with self.lock:
            held = len(self.jobs)
        return {"active": min(held, self.spec.max_batch), "waiting": max(0, held - self.spec.max_batch),
                "steps": self.last_steps}

    def _send(self, message) -> bool:
        """Whether the message went out (False once the pipe is closed or broken)."""
        with self.send_lock:
            if self.closed:
                return False
            try:
                self.connection.send(message)
                return True
            except OSError:  # the child is gone; the reader reports it
                self.closed = True
                return False

    def _read(self) -> None:
        """The front's end of the pipe: each step's events to their requests, until the
        engine stops or is gone; then whatever it still held fails."""
        try:
            why = self._relay()
        except Exception as error:  # a message it cannot read: no later event can be trusted to arrive
            why = f"the engine's messages could not be read: {type(error).__name__}: {error}"
            with contextlib.suppress(Exception):  # the steps would go on for requests nobody hears
                self.process.kill()
        with self.send_lock:
            self.closed = True
        with self.lock:  # the engine is gone: whatever it still held fails
            stranded = list(self.jobs.values())
            self.jobs.clear()
            self.remote.clear()
            if why is not None or stranded or not self.stopping:
                self.process.join(timeout=5)
                self.dead = why or f"the engine process exited (code {self.process.exitcode})"
        for job in stranded:
            job.finished = True
            with contextlib.suppress(Exception):
                job.on_event({"kind": "error", "message": self.dead, "status": 503})

    def _relay(self) -> str | None:
        """Each step's events to their requests until the pipe ends; why the engine
        stopped if it failed (None after a drain, or when the pipe closed)."""
        while True:
            try:
                message = self.connection.recv()
            except (EOFError, OSError):
                return None
            if message[0] == "stopped":
                return None
            if message[0] == "dead":  # the steps failed; the process exits
                return message[1]
            _, events, self.last_steps = message
            for remote, event in events:
                ended = event["kind"] in ("done", "error")
                with self.lock:
                    job = self.jobs.pop(remote, None) if ended else self.jobs.get(remote)
                    if ended and job is not None:
                        self.remote.pop(job, None)
                if job is None:
                    continue
                job.finished = job.finished or ended
                with contextlib.suppress(Exception):  # a client whose loop is gone hears nothing
                    job.on_event(event)


def _serve_engine(connection, spec: EngineSpec) -> None:
    """The engine process: load the model, run an Engine, relay commands and events."""
    # Out of the front's process group: a Ctrl-C reaching the group must not end the
    # steps under requests the front is still draining. The front decides when to stop
    # (its "stop", or the pipe's end when it is gone); SIGTERM still ends this process.
    os.setpgrp()
    try:
        import torch

        from unmask.models import from_pretrained
        from unmask.serving.engine import Engine

        torch.set_num_threads(spec.threads or max(1, torch.get_num_threads() - 1))
        device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = from_pretrained(spec.model_dir, dtype=spec.dtype, device=device)
    except Exception as error:  # the front reports it and exits
        connection.send(("failed", f"{type(error).__name__}: {error}"))
        return
    outbox: list[tuple[int, dict]] = []
    outbox_lock = threading.Lock()  # also orders the sends: a step's events leave in the order they were posted

    def post(remote: int, event: dict) -> None:
        with outbox_lock:
            outbox.append((remote, event))

    def send(message) -> None:
        with contextlib.suppress(OSError):  # the front is gone: nobody to tell
            connection.send(message)

    def flush() -> None:
        with outbox_lock:
            if outbox:
                send(("events", outbox[:], engine.steps))
                outbox.clear()
            if engine.dead is not None:  # the steps failed: say why, and this process ends
                send(("dead", f"the engine stopped: {engine.dead}"))

    # The front refuses what exceeds max_batch + max_queue, so this engine never does (it
    # may hold cancelled requests a step longer than the front counts them).
    engine = Engine(model, model.tokenizer, max_batch=spec.max_batch, max_queue=2 * (spec.max_batch + spec.max_queue),
                    after_step=flush)
    jobs: dict[int, Job] = {}
    engine.start()
    send(("ready", None))
    while engine.dead is None:
        if not connection.poll(1.0):  # wake now and then to notice a failed engine thread
            continue
        try:
            message = connection.recv()
        except (EOFError, OSError):  # the front is gone: finish what is running and exit
            message = ("stop",)
        if message[0] == "submit":
            _, remote, settings, eos_ids = message
            job = jobs[remote] = Job(settings, model.mask_id, eos_ids,
                                     on_event=lambda event, remote=remote: post(remote, event))
            try:
                engine.submit(job)
            except (QueueFull, Unavailable) as refused:
                del jobs[remote]
                post(remote, {"kind": "error", "message": str(refused),
                              "status": 429 if isinstance(refused, QueueFull) else 503})
                flush()
        elif message[0] == "cancel":
            job = jobs.get(message[1])
            if job is not None:
                engine.cancel(job)
        elif message[0] == "stop":
            engine.stop()
            flush()
            send(("stopped", None))
            return
        for remote in [r for r, job in jobs.items() if job.finished or job.cancelled]:
            del jobs[remote]
