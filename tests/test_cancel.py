"""cancel(): polled before prefill and between tokens; a cancelled request says so and frees the model."""


def test_cancel_before_start_does_no_model_work(generator):
    res = generator.generate("What does pass do?", ["pass does nothing."], max_new_tokens=8, cancel=lambda: True)
    assert res.finish_reason == "cancelled" and res.token_ids == [] and res.prompt_tokens == 0
    assert res.cache_hits == 0 and res.cache_misses == 0 and generator.store.stats()["entries"]["host"] == 0


def test_cancel_between_tokens_stops_decoding(generator):
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 3  # the pre-prefill check, then two tokens

    res = generator.generate("What does pass do?", ["pass does nothing."], max_new_tokens=20, cancel=cancel)
    assert res.finish_reason == "cancelled" and 1 <= len(res.token_ids) <= 2
    assert not generator.lock._is_owned()  # the model is free again
