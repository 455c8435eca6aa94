"""The engine interface itself: request validation, pad checks, batching of concurrent calls."""

from __future__ import annotations

import asyncio

import pytest

from axpo_rllm.engines import BatchingExecutor, EngineError, GenerationRequest, GenerationResult, check_image_pads

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
