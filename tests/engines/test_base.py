"""The engine interface itself: request validation, pad checks, batching of concurrent calls."""

from __future__ import annotations

import asyncio
import time

import pytest

from axpo_rllm.engines import BatchingExecutor, EngineError, GenerationRequest, GenerationResult, check_image_pads
from axpo_rllm.engines.base import SteppingExecutor

PAD = 7


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt_ids=()), "prompt_ids is empty"),
        (dict(max_tokens=0), "max_tokens must be >= 1, got 0"),
        (dict(temperature=-1.0), r"temperature must be in \[0, 2\], got -1.0"),
        (dict(temperature=2.5), r"temperature must be in \[0, 2\], got 2.5"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(stop=("",)), "stop strings must be non-empty"),
    ],
)
def test_bad_requests_name_the_value(kwargs, message):
    args = dict(prompt_ids=(1, 2), request_id="r1") | kwargs
    with pytest.raises(ValueError, match=message):
        GenerationRequest(**args)


def test_result_lengths_must_agree():
    with pytest.raises(ValueError, match="2 token ids but 1 logprobs"):
        GenerationResult(token_ids=(1, 2), logprobs=(0.0,), finish_reason="stop")
    with pytest.raises(ValueError, match="finish_reason"):
        GenerationResult(token_ids=(), logprobs=(), finish_reason="done")


@pytest.mark.parametrize(
    "ids, n_images, message",
    [
        ((1, PAD, 2), 2, r"1 image pad\(s\) .* but 2 image\(s\)"),
        ((1, PAD, PAD, 2), 2, "expanded run"),
        ((1, 2), 1, r"0 image pad\(s\)"),
    ],
)
def test_image_pad_mismatch_raises(ids, n_images, message):
    request = GenerationRequest(prompt_ids=ids, images=tuple(object() for _ in range(n_images)), request_id="r")
    with pytest.raises(EngineError, match=message):
        check_image_pads(request, PAD)


def test_one_pad_per_image_passes():
    check_image_pads(GenerationRequest(prompt_ids=(1, PAD, 3, PAD), images=(object(), object())), PAD)


def _echo(batch_sizes):
    def run(requests):
        batch_sizes.append(len(requests))
        return [GenerationResult(token_ids=r.prompt_ids[-1:], logprobs=(0.0,), finish_reason="length") for r in requests]

    return run


def test_concurrent_submissions_form_one_batch():
    sizes: list[int] = []
    executor = BatchingExecutor(_echo(sizes), name="test")
    requests = [GenerationRequest(prompt_ids=(i + 1,)) for i in range(6)]

    async def main():
        return await asyncio.gather(*(executor.submit_many([r]) for r in requests))

    results = asyncio.run(main())
    executor.shutdown()
    assert [r[0].token_ids for r in results] == [(i + 1,) for i in range(6)]
    assert sizes == [6]


def test_backend_failure_reaches_every_waiter_as_engine_error():
    def boom(requests):
        raise RuntimeError("backend down")

    executor = BatchingExecutor(boom, name="test")

    async def main():
        return await asyncio.gather(
            *(executor.submit_many([GenerationRequest(prompt_ids=(1,))]) for _ in range(3)), return_exceptions=True
        )

    errors = asyncio.run(main())
    executor.shutdown()
    assert all(isinstance(e, EngineError) and "backend down" in str(e) for e in errors)


def _submit_each(executor, requests):
    async def main():
        return await asyncio.gather(*(executor.submit_many([r]) for r in requests), return_exceptions=True)

    out = asyncio.run(main())
    executor.shutdown()
    return out


def test_one_bad_request_fails_alone_and_the_batch_is_bisected():
    """A backend that rejects any batch holding request 13 (a context overflow, say)."""
    calls: list[list[int]] = []

    def picky(requests):
        calls.append([r.prompt_ids[0] for r in requests])
        if any(r.prompt_ids[0] == 13 for r in requests):
            raise RuntimeError("prompt 13 is longer than max_model_len")
        return [GenerationResult(token_ids=r.prompt_ids, logprobs=(0.0,), finish_reason="stop") for r in requests]

    requests = [GenerationRequest(prompt_ids=(i,), request_id=f"r{i}") for i in range(10, 18)]
    out = _submit_each(BatchingExecutor(picky, name="test"), requests)
    bad = out[3]
    assert isinstance(bad, EngineError) and "max_model_len" in str(bad)
    assert [o[0].token_ids for i, o in enumerate(out) if i != 3] == [(i,) for i in range(10, 18) if i != 13]
    assert calls[0] == list(range(10, 18)) and [13] in calls, "split until the bad request is alone"
    assert len(calls) <= 2 * 3 + 1, "bisection, not one call per request"


def test_validate_rejects_a_request_before_it_joins_a_batch():
    seen: list[list[int]] = []

    def run(requests):
        seen.append([r.prompt_ids[0] for r in requests])
        return [GenerationResult(token_ids=r.prompt_ids, logprobs=(0.0,), finish_reason="stop") for r in requests]

    def validate(request):
        if request.prompt_ids[0] == 2:
            raise EngineError("prompt_ids hold 1 image pad(s) but 0 image(s) were given", request.request_id)

    out = _submit_each(BatchingExecutor(run, name="test", validate=validate), [GenerationRequest(prompt_ids=(i,)) for i in range(4)])
    assert isinstance(out[2], EngineError) and "image pad" in str(out[2])
    assert seen == [[0, 1, 3]] and [o[0].token_ids for o in (out[0], out[1], out[3])] == [(0,), (1,), (3,)]


def test_a_result_without_logprobs_is_a_contract_error_not_an_engine_error():
    from axpo_rllm.engines.base import BackendContractError, checked_result

    request = GenerationRequest(prompt_ids=(1, 2), request_id="q0#0/t0")
    with pytest.raises(BackendContractError, match=r"\[request q0#0/t0\] the server returned 3 token ids but none log-probs"):
        checked_result(request, [5, 6, 7], None, "stop", "the server")
    with pytest.raises(BackendContractError, match="3 token ids but 2 log-probs"):
        checked_result(request, [5, 6, 7], [-1.0, -1.0], "stop", "the server")
    assert not issubclass(BackendContractError, EngineError), "the agent retries EngineErrors; a contract error must stop the step"
    assert checked_result(request, [5], [-0.5], "length", "the server").logprobs == (-0.5,)


# ---------------------------------------------------------------- continuous batching (SteppingExecutor)


class CountingBackend:
    """A stepping backend with vLLM's contract: ``add`` starts a request (``length`` = steps it needs),
    ``step`` advances every running request by one token and reports those that finished."""

    def __init__(self, fail_add=(), fail_step_at=None, lose=()):
        self.running: dict[str, list] = {}
        self.steps = 0
        self.aborted: list[str] = []
        self.batch_sizes: list[int] = []
        self.fail_add, self.fail_step_at, self.lose = set(fail_add), fail_step_at, set(lose)
        self._next = 0

    def add(self, work):
        name, length = work
        if name in self.fail_add:
            raise ValueError(f"{name} is longer than max_model_len")
        key = f"k{self._next}"
        self._next += 1
        self.running[key] = [name, length, 0]
        return key

    def step(self):
        self.steps += 1
        if self.fail_step_at == self.steps:
            raise RuntimeError("device lost")
        self.batch_sizes.append(len(self.running))
        done = []
        for key, item in list(self.running.items()):
            item[2] += 1
            if item[2] >= item[1]:
                del self.running[key]
                if item[0] not in self.lose:
                    done.append((key, (item[0], item[2], self.steps)))
        time.sleep(0.002)
        return done

    def abort(self, keys):
        for key in keys:
            self.aborted.append(self.running.pop(key)[0])

    def has_unfinished(self):
        return bool(self.running)


def test_a_request_joins_the_running_batch_and_returns_before_the_long_one():
    backend = CountingBackend()
    executor = SteppingExecutor(backend, "test-steps")
    finish_order: list[str] = []

    async def one(name, length, delay=0.0):
        await asyncio.sleep(delay)
        out = await executor.submit((name, length), lambda o: o)
        finish_order.append(name)
        return out

    async def main():
        return await asyncio.gather(one("long", 400), one("a", 5), one("late", 5, delay=0.05))

    long, a, late = asyncio.run(main())
    executor.shutdown()
    assert finish_order == ["a", "late", "long"]
    assert late[2] < long[2], "the late request finished at an earlier engine step than the long one"
    assert max(backend.batch_sizes) == 2 and backend.steps < 400 + 5 + 5, "it ran beside the long one, not after it"


def test_a_request_the_backend_refuses_fails_alone_and_a_failed_step_fails_every_running_one():
    backend = CountingBackend(fail_add={"huge"})
    executor = SteppingExecutor(backend, "test-steps")

    async def main():
        return await asyncio.gather(*(executor.submit(w, lambda o: o) for w in [("ok", 3), ("huge", 3), ("ok2", 2)]),
                                    return_exceptions=True)

    ok, huge, ok2 = asyncio.run(main())
    assert isinstance(huge, EngineError) and "max_model_len" in str(huge)
    assert ok[:2] == ("ok", 3) and ok2[:2] == ("ok2", 2)
    backend.fail_step_at = backend.steps + 2

    async def crash():
        return await asyncio.gather(*(executor.submit((f"r{i}", 10), lambda o: o) for i in range(3)), return_exceptions=True)

    errors = asyncio.run(crash())
    assert all(isinstance(e, EngineError) and "device lost" in str(e) and "3 request(s) running" in str(e) for e in errors)
    assert sorted(backend.aborted) == ["r0", "r1", "r2"] and not backend.running
    executor.shutdown()


def test_a_cancelled_waiter_aborts_its_request_and_lost_work_never_spins():
    backend = CountingBackend(lose={"lost"})
    executor = SteppingExecutor(backend, "test-steps")

    async def main():
        task = asyncio.ensure_future(executor.submit(("cancel-me", 10_000), lambda o: o))
        await asyncio.sleep(0.05)
        task.cancel()
        lost = await asyncio.gather(executor.submit(("lost", 3), lambda o: o), return_exceptions=True)
        return lost[0]

    lost = asyncio.run(main())
    deadline = time.monotonic() + 5
    while backend.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert backend.aborted == ["cancel-me"] and executor.running() == 0
    assert isinstance(lost, EngineError) and "without returning them" in str(lost)
    executor.shutdown()


def test_a_result_the_converter_cannot_read_fails_its_request_alone_and_calls_run_between_steps():
    executor = SteppingExecutor(CountingBackend(), "test-steps")

    def convert(out):
        if out[0] == "bad":
            raise KeyError("logprobs")
        return out[0]

    async def main():
        return await asyncio.gather(*(executor.submit((n, 2), convert) for n in ("good", "bad")), return_exceptions=True)

    good, bad = asyncio.run(main())
    assert good == "good" and isinstance(bad, EngineError) and "logprobs" in str(bad)
    assert executor.call(lambda x: x * 2, 21) == 42
    executor.shutdown()
    with pytest.raises(EngineError, match="closed"):
        asyncio.run(executor.submit(("late", 1), lambda o: o))


def test_base_names_the_contract_and_both_executors_from_their_modules():
    from axpo_rllm.engines import base, batching, contract, stepping

    owners = {"RolloutEngine": contract, "GenerationRequest": contract, "EngineError": contract,
              "BatchingExecutor": batching, "InProcessEngine": batching, "SteppingExecutor": stepping}
    assert all(getattr(base, name) is getattr(owner, name) for name, owner in owners.items())
    assert set(base.__all__) <= set(dir(base))
