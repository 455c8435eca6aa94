"""The token-in/token-out contract, checked on every engine (transformers, vLLM, HTTP).

The vLLM and HTTP variants are marked ``vllm`` and run in ``.venv-vllm``.
"""

from __future__ import annotations

import asyncio

import pytest

from axpo_rllm.engines import EngineError, GenerationRequest

SCORE_TOL = 1e-4


def run(coro):
    return asyncio.run(coro)


def greedy(prompt_ids, images=(), max_tokens=24, **kw) -> GenerationRequest:
    return GenerationRequest(prompt_ids=prompt_ids, images=tuple(images), max_tokens=max_tokens, temperature=0.0, **kw)


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_greedy_logprobs_equal_teacher_forced_scores(engine, prompts, images, with_image):
    prompt, imgs = (prompts.with_images(1), images[:1]) if with_image else (prompts.text(), [])
    result = run(engine.generate(greedy(prompt, imgs)))
    assert len(result.token_ids) == len(result.logprobs) > 0
    assert all(lp <= 0 for lp in result.logprobs)
    scores = run(engine.score(prompt, imgs, result.token_ids))
    assert max(abs(a - b) for a, b in zip(scores, result.logprobs)) < SCORE_TOL


def test_continuation_is_token_exact(engine, prompts, images):
    """prompt + R[:k] (same images) reproduces R[k:] under greedy decoding: AXPO's resampling."""
    prompt, imgs = prompts.with_images(2), images
    full = run(engine.generate(greedy(prompt, imgs, max_tokens=24)))
    for k in (1, 9):
        tail = run(engine.generate(greedy(prompt + full.token_ids[:k], imgs, max_tokens=24 - k)))
        assert tail.token_ids == full.token_ids[k:]
        assert max(abs(a - b) for a, b in zip(tail.logprobs, full.logprobs[k:])) < SCORE_TOL


def test_seeded_sampling_is_reproducible_inside_batches(engine, prompts):
    prompt = prompts.text()

    def sampled(seed):
        return GenerationRequest(prompt_ids=prompt, max_tokens=16, temperature=1.0, seed=seed)

    alone = run(engine.generate(sampled(11)))
    batch = run(engine.generate_many([sampled(5), sampled(11), sampled(12)]))
    assert batch[1].token_ids == alone.token_ids
    assert max(abs(a - b) for a, b in zip(batch[1].logprobs, alone.logprobs)) < SCORE_TOL
    assert len({r.token_ids for r in batch}) > 1, "different seeds should give different samples"


def test_stop_string_keeps_the_closing_token(engine, prompts):
    """Restrict sampling to a few ids so ``</tool_call>`` appears; generation stops right after it."""
    close_id = prompts.token_id("</tool_call>")
    keep = {close_id, prompts.token_id("<tool_call>"), *prompts.tokenizer.encode(" box", add_special_tokens=False)}
    banned = tuple(i for i in range(len(prompts.tokenizer)) if i not in keep)
    for seed in range(20):
        request = GenerationRequest(prompt_ids=prompts.text(), max_tokens=40, temperature=1.0, seed=seed,
                                    stop=("</tool_call>",), banned_token_ids=banned)
        result = run(engine.generate(request))
        assert set(result.token_ids) <= keep
        if close_id in result.token_ids:
            assert result.token_ids[-1] == close_id and result.token_ids.count(close_id) == 1
            assert (result.finish_reason, result.stop_reason) == ("stop", "</tool_call>")
            return
    pytest.fail("</tool_call> never sampled in 20 seeds")


def test_stop_token_id_ends_generation(engine, prompts):
    full = run(engine.generate(greedy(prompts.text(), max_tokens=12)))
    stop_id = full.token_ids[5]
    first = full.token_ids.index(stop_id)
    result = run(engine.generate(greedy(prompts.text(), max_tokens=12, stop_token_ids=(stop_id,))))
    assert result.token_ids == full.token_ids[: first + 1]
    assert (result.finish_reason, result.stop_reason) == ("stop", stop_id)


def test_length_finish(engine, prompts):
    result = run(engine.generate(greedy(prompts.text(), max_tokens=3, banned_token_ids=prompts_eos(prompts))))
    assert len(result.token_ids) == 3 and result.finish_reason == "length"


def prompts_eos(prompts):
    return (prompts.token_id("<|im_end|>"), prompts.token_id("<|endoftext|>"),
            prompts.token_id("<|image_pad|>"), prompts.token_id("<|video_pad|>"))


def test_banned_ids_are_never_sampled(engine, prompts):
    prompt = prompts.text()
    greedy_ids = run(engine.generate(greedy(prompt, max_tokens=16))).token_ids
    banned = tuple(sorted(set(greedy_ids)))
    requests = [GenerationRequest(prompt_ids=prompt, max_tokens=32, temperature=1.5, seed=s, banned_token_ids=banned)
                for s in range(4)]
    requests.append(greedy(prompt, max_tokens=16, banned_token_ids=banned))
    for result in run(engine.generate_many(requests)):
        assert not set(result.token_ids) & set(banned)


def test_image_and_video_pads_are_banned_by_default(engine, prompts):
    """``banned_token_ids=None`` samples exactly as an explicit ban of both pads (and none appear).

    Seeded sampling makes the two runs comparable token for token; that explicit bans hold is
    shown by ``test_banned_ids_are_never_sampled``.
    """
    pads = (prompts.token_id("<|image_pad|>"), prompts.token_id("<|video_pad|>"))

    def requests(banned):
        return [GenerationRequest(prompt_ids=prompts.text(f"Question {s}?"), max_tokens=24, temperature=2.0, seed=s,
                                  banned_token_ids=banned) for s in range(3)]

    default = run(engine.generate_many(requests(banned=None)))
    explicit = run(engine.generate_many(requests(banned=pads)))
    assert [r.token_ids for r in default] == [r.token_ids for r in explicit]
    assert all(not set(r.token_ids) & set(pads) for r in default)


def test_pad_image_mismatch_is_an_engine_error(engine, prompts, images):
    with pytest.raises(EngineError, match="image pad"):
        run(engine.generate(greedy(prompts.with_images(1), images[:2], request_id="bad")))
