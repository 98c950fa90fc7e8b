"""The engine worker: the one thread that runs the model, with a queue of jobs, the live KV state and the prefix
cache. The server, `edge chat` and the Python API submit jobs to it and read records back through a sink, so the
session, its state and the caches are only ever touched from this thread.

A job is checked when it is submitted (a bad prompt fails the caller at once, not in the queue), then waits its
turn; setting its `cancel` stops it at its next token (a client that hung up). After each job the state's tokens
are kept as a prefix-cache entry, so that the next request sharing a prefix with any recent one skips it.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from edge import generate as gen
from edge.decoder import Decoder
from edge.prefix import PrefixCache
from edge.tokenizer import Tokenizer

DONE = object()  # the last item a sink receives for a job, after its records or its exception


class BusyError(RuntimeError):
    """The queue is full (HTTP 429)."""


@dataclass(eq=False)
class Job:
    ids: list[int]  # the prompt's token ids
    params: gen.GenerationParams
    sink: Callable[[object], None]  # receives each Record, then an exception if one ended the job, then DONE
    cache_prompt: bool = True  # reuse and keep prefixes (llama.cpp's request field of that name)
    cancel: threading.Event = field(default_factory=threading.Event)  # set: stop at the next token
    done: threading.Event = field(default_factory=threading.Event)  # set once the worker is finished with it
    task: Callable[[], object] | None = None  # instead of a generation: a function to run on the worker thread

    def put(self, item: object) -> None:
        """Hand an item to the sink; a sink that fails (its reader is gone) cancels the job, never the worker."""
        try:
            self.sink(item)
        except Exception:
            self.cancel.set()


class Worker:
    def __init__(self, decoder: Decoder, tokenizer: Tokenizer, eos_ids: Sequence[int],
                 prefix: PrefixCache | None = None):
        self.decoder, self.tokenizer, self.eos_ids, self.prefix = decoder, tokenizer, frozenset(eos_ids), prefix
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.waiting = 0  # jobs in the queue
        self.busy = 0  # jobs generating (0 or 1)
        self.state = None  # the live KV state, made on the first job: the last job's tokens stay in it
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, ids: Sequence[int], params: gen.GenerationParams, sink: Callable[[object], None],
               cache_prompt: bool = True, max_queue: int | None = None) -> Job:
        """Queue a generation; raises ContextError for a prompt the model cannot take and BusyError when
        max_queue jobs already wait behind a running one."""
        gen.check_prompt(self.decoder, ids)
        job = Job(list(ids), params, sink, cache_prompt)
        with self._lock:
            if max_queue is not None and self.busy and self.waiting >= max_queue:
                raise BusyError(f"the server is busy ({self.waiting} requests waiting); retry shortly")
            self.waiting += 1
            self._start()
        self.jobs.put(job)
        return job

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="edge-worker", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            with self._lock:
                self.waiting -= 1
                self.busy = 1
            try:
                if job.task is not None:
                    job.put(self._task(job.task))
                elif not job.cancel.is_set():  # a client that left while waiting costs nothing
                    self._generate(job)
            except Exception as e:  # whatever one job meets, the worker lives on for the next
                job.put(e)
            finally:
                with self._lock:
                    self.busy = 0
                job.put(DONE)
                job.done.set()

    def _generate(self, job: Job) -> None:
        try:
            state = self._prepare(job)
            for record in gen.stream(self.decoder, self.tokenizer, job.ids, job.params, self.eos_ids, state):
                job.put(record)
                if record.finish_reason is None and job.cancel.is_set():
                    break
        except Exception as e:  # the caller's to report; the worker goes on with the next job
            if self.state is not None:
                self.state.trim(0)  # a state cut short mid-step is not trusted
            job.put(e)
            return
        if job.cache_prompt and self.prefix is not None:
            self.prefix.remember(self.state)

    @staticmethod
    def _task(task: Callable[[], object]) -> object:
        try:
            return task()
        except Exception as e:
            return e

    def _prepare(self, job: Job):
        """The live state, holding the longest prefix of the prompt that it or the prefix cache has."""
        if self.state is None:
            self.state = self.decoder.new_state()
        if not job.cache_prompt or self.prefix is None:
            self.state.trim(0)
        else:
            self.prefix.prepare(self.state, job.ids)
        return self.state

    def call(self, task: Callable[[], object]) -> object:
        """Run task on the worker thread after the jobs queued before it, and return its result (the prefix cache
        is only touched there: saving it at shutdown goes through here)."""
        results: queue.Queue = queue.Queue()
        job = Job([], gen.GenerationParams(), lambda item: item is DONE or results.put(item), task=task)
        with self._lock:
            self.waiting += 1
            self._start()
        self.jobs.put(job)
        job.done.wait()
        result = results.get()
        if isinstance(result, Exception):
            raise result
        return result
