"""The batching engine behind ``alignkit serve``: requests that arrive together share one ``rollout.sample`` call.

One asyncio task owns the model. It waits for a job (one HTTP request: one or more rows, a row being one
prompt to continue once), then keeps collecting jobs for up to ``wait_ms`` or until ``max_batch`` rows are
waiting, groups the rows whose sampling rule is the same (greedy; or one temperature/top_p pair; a seeded
request alone, so its answer does not depend on what else was in the batch), and runs each group through
``sample`` in a worker thread, ``max_batch`` rows at a time, while the event loop keeps accepting requests.
Rows of one group may ask for different ``max_tokens``: the group decodes to the largest and each row is cut
to its own (a prefix of a sample is a sample of the shorter length, so nothing changes in distribution).

Log-probabilities are those of the model itself (temperature 1, no top-p), as OpenAI reports them, so they
are recomputed by one batched no-grad forward over prompt + response after sampling: the sampler only knows
the log-prob of the token it drew under the tempered, filtered distribution, and top-k alternatives and
judge candidates need the whole next-token distribution at each position.

Streaming (a job with an ``events`` queue): the sampler calls back after every decode step (``sample``'s
``on_step``), and each streaming row's new token goes to its job's queue at once, with its log-prob and top-k
taken from that step's logits (the model's own, before temperature and top-p) instead of the forward afterwards.
Rows of streaming and non-streaming requests share a batch. A row is done at its EOS or its own max_tokens; the
HTTP side marks a row ``cancelled`` when it needs no more tokens (a stop string, a client gone), and the batch
stops early once every row is done or cancelled.

Scheduling: one batch decodes at a time (no continuous batching). Requests that arrive while it decodes wait in
the queue and all join the next batch, which starts as soon as the current one ends (they are already queued,
so no ``wait_ms`` is spent on them), up to ``max_batch`` rows.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from alignkit.models import unwrap
from alignkit.rollout import SamplingConfig, _eos_ids, sample

HEAD_CHUNK = 512  # positions per LM-head matmul in the log-prob forward: (512, 49k) fp32 logits = 100 MB
SCORE_TOKENS = 8192  # padded tokens per backbone forward of the log-prob pass


@dataclass
class Row:
    """One prompt to continue once. Filled by the engine: tokens, ended, and the log-prob fields asked for."""

    prompt_ids: list[int]
    max_tokens: int
    top_logprobs: int | None = None  # None: no log-probs; k >= 0: each token's log-prob and the top k
    candidate_ids: list[int] | None = None  # log-prob of each at the first generated position
    echo: bool = False  # log-probs of the prompt tokens too (/v1/completions echo)
    # results
    tokens: list[int] = field(default_factory=list)  # generated ids, the EOS (if any) included
    ended: bool = False  # True: stopped by EOS; False: cut at max_tokens
    token_logprobs: list[float] = field(default_factory=list)  # for echo: prompt tokens (from the 2nd), then tokens
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # same positions, k best (id, log-prob)
    candidate_logprobs: list[float] = field(default_factory=list)
    done: bool = False  # streaming: EOS drawn or max_tokens reached (set by the worker)
    cancelled: bool = False  # streaming: the HTTP side needs no more tokens of this row (set by the event loop)


@dataclass
class Job:
    rows: list[Row]
    temperature: float  # 0 = greedy
    top_p: float
    seed: int | None
    future: asyncio.Future
    min_tokens: int = 0  # EOS banned before this many tokens (vLLM's min_tokens)
    number: int = 0  # arrival order, makes a seeded job its own group
    # streaming: per decode step one list of StepEvents, then None once the job has ended (result or error)
    events: asyncio.Queue | None = None

    @property
    def key(self) -> tuple:
        if self.seed is not None:
            return ("seeded", self.number)
        if self.temperature == 0:
            return ("greedy", self.min_tokens)
        return ("sample", self.temperature, self.top_p, self.min_tokens)


@dataclass
class StepEvent:
    """One new token of a streaming row. ``logprob``/``top`` are set when the row asked for log-probs."""

    row: int  # index in the job's rows
    token: int
    done: bool  # the row's last token (EOS, or its max_tokens reached)
    eos: bool
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


class Engine:
    """Collects jobs from the event loop and runs them in batches; `await engine.submit(job_rows, ...)`."""

    def __init__(self, model, tokenizer, max_batch: int = 32, wait_ms: float = 5.0, dtype: str = "auto",
                 max_pending: int = 256):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.wait = max_batch, wait_ms / 1000
        self.dtype = dtype
        self.max_pending = max_pending  # jobs queued or running; more -> the caller answers 429
        self.pending = 0
        self.batches: list[int] = []  # rows per sample() call, for tests and the bench
        self.steps = 0  # decode steps run while streaming rows were in the batch (tests watch it move)
        self._queue: asyncio.Queue[Job] | None = None
        self._task: asyncio.Task | None = None
        self._numbers = itertools.count()

    # -- event-loop side ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop the worker; requests still queued get an error instead of waiting forever."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))

    def busy(self) -> bool:
        return self.pending >= self.max_pending

    async def submit(self, rows: list[Row], temperature: float, top_p: float, seed: int | None = None,
                     min_tokens: int = 0, events: asyncio.Queue | None = None) -> list[Row]:
        """Queue the rows and wait for them to be decoded. With ``events``, every new token of a row is also put
        there as it is decoded (lists of ``StepEvent``; None at the end)."""
        future = asyncio.get_running_loop().create_future()
        job = Job(rows, temperature, top_p, seed, future, min_tokens, next(self._numbers), events)
        self.pending += 1
        try:
            self._queue.put_nowait(job)
            return await future
        finally:
            self.pending -= 1
            if events is not None:
                events.put_nowait(None)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            n_rows = len(jobs[0].rows)
            deadline = loop.time() + self.wait
            while n_rows < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(self._queue.get(), timeout)
                    except asyncio.TimeoutError:  # a distinct class before Python 3.11
                        break
                jobs.append(job)
                n_rows += len(job.rows)
            try:
                await self._run(jobs)
            except Exception as error:  # noqa: BLE001 - never let the worker die and leave requests hanging
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)

    async def _run(self, jobs: list[Job]) -> None:
        """Decode jobs group by group; every job's future gets its rows or the error that stopped them."""
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            if not job.future.done():  # the client may have gone away
                groups.setdefault(job.key, []).append(job)
        for group in groups.values():
            try:
                await asyncio.to_thread(self._run_group, group, asyncio.get_running_loop())
            except Exception as error:  # noqa: BLE001 - reported to each waiting request as a 500
                for job in group:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            for job in group:
                if not job.future.done():
                    job.future.set_result(job.rows)

    # -- worker-thread side ---------------------------------------------------------------------------------

    def _run_group(self, jobs: list[Job], loop: asyncio.AbstractEventLoop | None = None) -> None:
        first = jobs[0]
        owners = [(job, i) for job in jobs for i in range(len(job.rows))]  # (job, index of the row in it)
        generator = torch.Generator().manual_seed(first.seed) if first.seed is not None else None
        for start in range(0, len(owners), self.max_batch):
            chunk_owners = owners[start : start + self.max_batch]
            chunk = [job.rows[i] for job, i in chunk_owners]
            config = SamplingConfig(
                max_new_tokens=max(r.max_tokens for r in chunk),
                min_new_tokens=first.min_tokens,
                temperature=first.temperature if first.temperature > 0 else 1.0,
                top_p=first.top_p,
                greedy=first.temperature == 0,
                dtype=self.dtype,
            )
            streamed = [job.events is not None for job, _ in chunk_owners]
            hook, wants_logits = None, False
            if any(streamed) and loop is not None:
                # echo's prompt log-probs are sent before the first token: score the prompts now
                echo = [r for r, s in zip(chunk, streamed, strict=True) if s and r.echo and r.top_logprobs is not None]
                if echo:
                    self._score(echo)
                wants_logits = any(s and (r.top_logprobs is not None or r.candidate_ids)
                                   for r, s in zip(chunk, streamed, strict=True))
                hook = self._stream_hook(chunk_owners, streamed, loop)
            rollout = sample(self.model, [r.prompt_ids for r in chunk], config, tokenizer=self.tokenizer,
                             generator=generator, on_step=hook, step_logits=wants_logits)
            self.batches.append(len(chunk))
            for i, row in enumerate(chunk):
                if streamed[i] and hook is not None:
                    continue  # filled token by token by the hook
                length = int(rollout.response_mask[i].sum())
                ended = bool(rollout.ended_with_eos[i]) and length <= row.max_tokens
                row.tokens = rollout.response_ids[i, : min(length, row.max_tokens)].tolist()
                row.ended = ended
            scored = [r for i, r in enumerate(chunk)
                      if (r.top_logprobs is not None or r.candidate_ids) and not (streamed[i] and hook is not None)]
            if scored:
                self._score(scored)

    def _stream_hook(self, owners: list[tuple[Job, int]], streamed: list[bool], loop: asyncio.AbstractEventLoop):
        """The sampler's per-step callback for a batch holding streaming rows: append each streaming row's token
        (and its log-probs from the step's logits) to the row and post it to the row's job at once."""
        rows = [job.rows[i] for job, i in owners]
        eos = set(_eos_ids(unwrap(self.model), self.tokenizer, None))  # the sampler's own EOS ids
        produced, finished = [0] * len(rows), [False] * len(rows)
        for row, s in zip(rows, streamed, strict=True):
            if s:
                row.tokens, row.done = [], False

        def on_step(t: int, alive: Tensor, tokens: Tensor, logits: Tensor | None) -> bool:
            self.steps += 1
            batch_rows, drawn = alive.tolist(), tokens.tolist()
            logprobs = torch.log_softmax(logits, dim=-1) if logits is not None else None  # (n, V)
            out: dict[int, tuple[Job, list[StepEvent]]] = {}
            for k, b in enumerate(batch_rows):
                if finished[b]:
                    continue
                row, token = rows[b], drawn[k]
                produced[b] += 1
                finished[b] = token in eos or produced[b] >= row.max_tokens
                if not streamed[b]:
                    continue
                row.tokens.append(token)
                row.ended, row.done = token in eos, finished[b]
                event = StepEvent(owners[b][1], token, row.done, row.ended)
                if logprobs is not None:
                    if t == 0 and row.candidate_ids:
                        row.candidate_logprobs = logprobs[k, row.candidate_ids].tolist()
                    if row.top_logprobs is not None:
                        event.logprob = float(logprobs[k, token])
                        event.top = []
                        if row.top_logprobs > 0:
                            values, indices = logprobs[k].topk(row.top_logprobs)
                            event.top = list(zip(indices.tolist(), values.tolist(), strict=True))
                        row.token_logprobs.append(event.logprob)
                        row.top.append(event.top)
                job = owners[b][0]
                out.setdefault(id(job), (job, []))[1].append(event)
            for job, events in out.values():
                loop.call_soon_threadsafe(job.events.put_nowait, events)
            # stop the batch once no row needs another token (every row at its EOS or max_tokens, or cancelled)
            return all(f or r.cancelled for f, r in zip(finished, rows, strict=True))

        return on_step

    @torch.no_grad()
    def _score(self, rows: list[Row]) -> None:
        """Fill token_logprobs / top / candidate_logprobs from no-grad forwards over prompt + response.

        The hidden state at position t predicts token t + 1, so for a prompt of P tokens and T response tokens
        the positions P-1 .. P+T-2 score the response (P-1 alone for candidates); with echo, 0 .. P-2 score the
        prompt too. Rows are right-padded: real tokens never attend to the padding after them, and positions
        start at 0 as in an unpadded forward. Rows go in length-sorted groups of at most SCORE_TOKENS padded
        tokens, and the head sees HEAD_CHUNK positions at a time, so memory stays bounded for long prompts.
        """
        lm = unwrap(self.model)
        backbone, head = lm.base_model, lm.get_output_embeddings()
        device = next(lm.parameters()).device
        pad = self.tokenizer.pad_token_id or 0
        order = sorted(rows, key=lambda r: len(r.prompt_ids) + len(r.tokens))
        group: list[Row] = []
        for row in order + [None]:
            width = len(row.prompt_ids) + len(row.tokens) if row is not None else 0
            if group and (row is None or (len(group) + 1) * width > SCORE_TOKENS):
                seqs = [r.prompt_ids + r.tokens for r in group]
                ids = torch.full((len(group), len(seqs[-1])), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, seq in enumerate(seqs):
                    ids[i, : len(seq)] = torch.tensor(seq)
                    mask[i, : len(seq)] = 1
                hidden = backbone(input_ids=ids.to(device), attention_mask=mask.to(device),
                                  use_cache=False).last_hidden_state  # (rows, width, C)
                for i, r in enumerate(group):
                    self._score_row(r, seqs[i], hidden[i], head)
                group = []
            if row is not None:
                group.append(row)

    @staticmethod
    def _score_row(row: Row, seq: list[int], hidden: Tensor, head) -> None:
        P, T = len(row.prompt_ids), len(row.tokens)
        first = 0 if row.echo else P - 1
        last = P + T - 1 if row.top_logprobs is not None else P  # exclusive; P: the first position only
        targets = torch.tensor(seq[first + 1 : last + 1], device=hidden.device)
        row.token_logprobs, row.top = [], []
        for start in range(first, last, HEAD_CHUNK):
            end = min(start + HEAD_CHUNK, last)
            logprobs = torch.log_softmax(head(hidden[start:end]).float(), dim=-1)  # (end - start, V)
            if row.candidate_ids and start <= P - 1 < end:
                row.candidate_logprobs = logprobs[P - 1 - start, row.candidate_ids].tolist()
            if row.top_logprobs is None:
                continue
            picked = logprobs.gather(1, targets[start - first : end - first, None]).squeeze(1)
            row.token_logprobs += picked.tolist()
            if row.top_logprobs > 0:
                values, indices = logprobs.topk(row.top_logprobs, dim=-1)
                row.top += [list(zip(ix, v, strict=True)) for ix, v in zip(indices.tolist(), values.tolist(),
                                                                             strict=True)]
            else:
                row.top += [[] for _ in range(end - start)]
