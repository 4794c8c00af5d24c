"""The engine's text: plain rows (table lookup, events made on the event loop) and the streamed path
give the same tokens and text, equal to the tokenizer's decode, for every tokenizer kind."""

from __future__ import annotations

import asyncio

import pytest

from server.decoding import DecodingParams
from server.engine import FinishEvent, GenerationRequest, ModelEngine, TokenEvent
from server.text.table import TokenTable

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["char", "word", "bpe"])
def bundle(request, tmp_path_factory, random_lm_bundle):
    return random_lm_bundle(tmp_path_factory.mktemp("engine-text"), request.param)


async def generate(engine, prompt_ids, params):
    tokens, texts, finish = [], [], None
    async for event in engine.submit(GenerationRequest("r", prompt_ids, params)):
        if isinstance(event, TokenEvent):
            tokens += event.token_ids
            texts.append(event.text)
        else:
            finish = event
    assert isinstance(finish, FinishEvent)
    return tokens, "".join(texts), finish


def test_plain_and_streamed_rows_give_the_decoded_text(bundle):
    tokenizer = bundle.tokenizer("text")
    prompts = [[1], [1, *tokenizer.encode("the cat").ids], [1, *tokenizer.encode("日本").ids]]

    async def body():
        engine = ModelEngine(bundle)
        await engine.start()
        assert engine._core.table is not None
        try:
            runs = []
            for seed in range(12):
                for prompt_ids in prompts:
                    length = 5 + 7 * (seed % 4)  # some end at their limit inside a split character
                    plain = DecodingParams(strategy="sample", seed=seed, max_new_tokens=length)
                    streamed = DecodingParams(strategy="sample", seed=seed, max_new_tokens=length,
                                              return_log_probs=True)
                    # Submitted together: the two rows share the batch's steps.
                    runs.append((prompt_ids, *await asyncio.gather(generate(engine, prompt_ids, plain),
                                                                   generate(engine, prompt_ids, streamed))))
            return runs
        finally:
            await engine.stop(1.0)

    runs = asyncio.run(body())
    for prompt_ids, (tokens, text, finish), (tokens2, text2, finish2) in runs:
        assert tokens == tokens2 == finish.generated_ids == finish2.generated_ids
        assert finish.reason == finish2.reason
        assert text == finish.text == text2 == finish2.text
        whole, before = tokenizer.decode(prompt_ids + tokens), tokenizer.decode(prompt_ids)
        assert text == whole[len(before):]  # a continuation: a word tokenizer's starts with its space
        assert finish.hypotheses[0].log_prob == pytest.approx(finish2.hypotheses[0].log_prob)
    table = TokenTable.build(tokenizer)
    generated = [token for run in runs for token in run[1][0]]
    if table.separator == "" and not table.whole.all():  # byte-level BPE: characters were split
        assert any(not table.whole[token] for token in generated)
