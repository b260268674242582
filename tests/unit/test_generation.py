"""Generation: KV-cache decoding against full recomputation, sampling, eos, context limits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llamaray.model import KVCache, Llama, get_preset
from llamaray.model.generation import SamplingConfig, generate, generate_text, sample_top_p

VOCAB = 97
GREEDY = SamplingConfig(max_new_tokens=12, temperature=0.0)
SAMPLED = SamplingConfig(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=1234)


def make_model(backend: str = "sdpa", seed: int = 0, **changes) -> Llama:
    torch.manual_seed(seed)
    args = get_preset("debug").args.with_(vocab_size=VOCAB, **changes)
    return Llama(args, attention_backend=backend).eval()


def make_prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model() -> Llama:
    return make_model()


# ----------------------------------------------------------------------- KV cache vs full


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_logits_match_full_forward(backend, chunk):
    model = make_model(backend)
    prompt_len, total = 5, 17
    tokens = torch.randint(0, VOCAB, (2, total), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        full = model(tokens)
        cache = KVCache(model.args, batch_size=2)
        pieces = [model(tokens[:, :prompt_len], cache=cache, start_pos=0)]
        for start in range(prompt_len, total, chunk):
            stop = min(start + chunk, total)
            pieces.append(model(tokens[:, start:stop], cache=cache, start_pos=start))
    incremental = torch.cat(pieces, dim=1)
    assert incremental.shape == full.shape == (2, total, VOCAB)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=0)


def test_cached_equals_uncached_greedy_with_ragged_prompts(model):
    prompts = make_prompts([3, 8, 5, 1])
    cached = generate(model, prompts, GREEDY)
    uncached = generate(model, prompts, GREEDY, use_cache=False)
    assert cached == uncached
    assert [len(c) for c in cached] == [GREEDY.max_new_tokens] * len(prompts)


def test_batched_ragged_prompts_equal_each_prompt_alone(model):
    # Catches any leak between rows or pad token reaching the model: both paths would share it.
    prompts = make_prompts([3, 8, 5, 1])
    batched = generate(model, prompts, GREEDY)
    alone = [generate(model, [p], GREEDY)[0] for p in prompts]
    assert batched == alone


def test_backends_give_same_greedy_tokens():
    prompts = make_prompts([4, 7, 2])
    outs = {
        backend: generate(make_model(backend), prompts, GREEDY) for backend in ("sdpa", "reference")
    }
    assert outs["sdpa"] == outs["reference"]
    assert outs["sdpa"] == generate(make_model("reference"), prompts, GREEDY, use_cache=False)


def test_greedy_follows_argmax_of_the_model(model):
    prompt = make_prompts([6])[0]
    out = generate(model, [prompt], SamplingConfig(max_new_tokens=5, temperature=0.0))[0]
    seq = list(prompt)
    with torch.inference_mode():
        for _ in range(5):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt) :]


# ----------------------------------------------------------------------- sampling


def test_sampling_cached_equals_uncached_and_is_seeded(model):
    prompts = make_prompts([3, 8, 5])
    cached = generate(model, prompts, SAMPLED)
    assert cached == generate(model, prompts, SAMPLED, use_cache=False)
    assert cached == generate(model, prompts, SAMPLED)
    # Sampling is really happening: it differs from greedy decoding.
    assert cached != generate(model, prompts, GREEDY)


def test_seed_reproducible_and_different_seeds_differ(model):
    prompts = make_prompts([4, 6])
    hot = SamplingConfig(max_new_tokens=24, temperature=1.5, top_p=1.0, seed=7)
    first = generate(model, prompts, hot)
    assert first == generate(model, prompts, hot)
    assert first != generate(model, prompts, dataclasses.replace(hot, seed=8))


def test_seeded_sampling_leaves_global_rng_alone(model):
    state = torch.get_rng_state()
    generate(model, make_prompts([4]), SAMPLED)
    assert torch.equal(torch.get_rng_state(), state)


def test_top_p_keeps_smallest_nucleus():
    g = torch.Generator().manual_seed(0)
    # Powers of two are exact in fp32: after tokens 3 and 0 the mass is exactly 0.75, so with
    # p=0.75 token 1 is surplus (a `>` comparison, as in Meta's code, would keep it).
    probs = torch.tensor([0.25, 0.125, 0.0625, 0.5, 0.0625])
    draws = sample_top_p(probs.expand(4000, -1), 0.75, g)
    assert draws.shape == (4000,)
    assert set(draws.tolist()) == {0, 3}
    # Renormalized within the nucleus: token 3 has 2/3 of the mass.
    assert abs((draws == 3).float().mean().item() - 2 / 3) < 0.03
    # Just above the boundary the next token joins.
    assert set(sample_top_p(probs.expand(4000, -1), 0.76, g).tolist()) == {0, 1, 3}


def test_top_p_never_samples_outside_nucleus_random_distributions():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(64, 50, generator=g) * 3, dim=-1)
    p = 0.6
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    size = ((sorted_probs.cumsum(-1) - sorted_probs) < p).sum(-1)  # nucleus size per row
    for _ in range(50):
        draws = sample_top_p(probs, p, g)
        ranks = (order == draws[:, None]).float().argmax(-1)
        assert bool((ranks < size).all())
    # The nucleus really reaches p and is the smallest such set.
    reached = sorted_probs.cumsum(-1).gather(-1, (size - 1)[:, None]).squeeze(-1)
    assert bool((reached >= p).all())
    assert bool(((reached - sorted_probs.gather(-1, (size - 1)[:, None]).squeeze(-1)) < p).all())


def test_top_p_small_is_argmax():
    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(200, 30, generator=g), dim=-1)
    for p in (1e-4, 0.0):
        assert torch.equal(sample_top_p(probs, p, g), probs.argmax(-1))


def test_top_p_accepts_leading_dims():
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9]]).expand(3, 2, 2)
    assert sample_top_p(probs, 0.5).tolist() == [[0, 1]] * 3


# ----------------------------------------------------------------------- eos


def test_eos_stops_each_row_at_its_first_generated_eos(model):
    prompts = make_prompts([3, 8, 5])
    free = generate(model, prompts, GREEDY)
    # Declare as eos a token the first row first generates at index >= 2 (so it truncates).
    eos = next(t for i, t in enumerate(free[0]) if i >= 2 and t not in free[0][:i])
    stops = generate(model, prompts, dataclasses.replace(GREEDY, eos_id=eos))
    expected = [row[: row.index(eos)] if eos in row else row for row in free]
    assert stops == expected
    assert len(stops[0]) < GREEDY.max_new_tokens
    uncached = generate(model, prompts, dataclasses.replace(GREEDY, eos_id=eos), use_cache=False)
    assert stops == uncached


def test_eos_ends_the_loop_early(model):
    prompt = make_prompts([5])[0]
    free = generate(model, [prompt], GREEDY)[0]
    k = next(i for i, t in enumerate(free) if i >= 2 and t not in free[:i])
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = generate(model, [prompt], dataclasses.replace(GREEDY, eos_id=free[k]))
    finally:
        handle.remove()
    assert out == [free[:k]]
    assert len(calls) == k + 1  # prefill + one call per further token up to the eos


def test_eos_inside_a_prompt_does_not_stop(model):
    short, long = make_prompts([2, 9])
    free = generate(model, [short, long], GREEDY)
    # While the short row decodes, the long row is still reading its prompt: an eos there is
    # prompt text, not an end.
    eos = long[4]
    assert eos not in free[1]
    out = generate(model, [short, long], dataclasses.replace(GREEDY, eos_id=eos))
    assert out[1] == free[1]


def test_eos_predicted_at_a_prompt_position_does_not_stop(model):
    # The model's (discarded) prediction at a position where a row still has prompt tokens
    # must not end that row, even once every other row is done.
    short, long = make_prompts([2, 9])
    with torch.inference_mode():
        predicted = model(torch.tensor([long]))[0].argmax(-1).tolist()
    config = SamplingConfig(max_new_tokens=3, temperature=0.0)
    alone = generate(model, [long], config)[0]
    # Predictions for positions 2..4, decided while the short row is still generating.
    eos = next(t for t in predicted[1:4] if t != alone[0])
    config = dataclasses.replace(config, eos_id=eos)
    expected = [generate(model, [short], config)[0], generate(model, [long], config)[0]]
    assert expected[1]
    assert generate(model, [short, long], config) == expected


def test_tiny_temperature_is_greedy(model):
    prompts = make_prompts([3, 8, 5])
    cold = SamplingConfig(max_new_tokens=12, temperature=1e-4, top_p=1.0, seed=3)
    assert generate(model, prompts, cold) == generate(model, prompts, GREEDY)


# ----------------------------------------------------------------------- limits and modes


def test_prompt_longer_than_context_raises():
    model = make_model(max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        generate(model, [[1] * 17], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1, 2], []], GREEDY)
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, [[1, VOCAB]], GREEDY)


def test_generation_stops_at_max_seq_len():
    model = make_model(max_seq_len=16)
    prompts = make_prompts([10, 3, 16])
    config = SamplingConfig(max_new_tokens=20, temperature=0.0)
    out = generate(model, prompts, config)
    assert [len(o) for o in out] == [6, 13, 0]
    assert out == generate(model, prompts, config, use_cache=False)


def test_zero_new_tokens_and_empty_batch(model):
    assert generate(model, make_prompts([3, 5]), dataclasses.replace(GREEDY, max_new_tokens=0)) == [
        [],
        [],
    ]
    assert generate(model, [], GREEDY) == []


def test_invalid_config_raises():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=-1)


@pytest.mark.parametrize("training", [True, False])
def test_restores_train_mode(model, training):
    model.train(training)
    try:
        generate(model, make_prompts([3]), GREEDY)
        assert model.training is training
    finally:
        model.eval()


def test_bf16_model_gets_a_bf16_cache():
    # A fp32 cache would hand fp32 keys to bf16 queries and SDPA would refuse the mix.
    model = make_model().to(torch.bfloat16)
    prompts = make_prompts([3, 6])
    out = generate(model, prompts, GREEDY)
    assert [len(o) for o in out] == [GREEDY.max_new_tokens] * 2
    assert all(0 <= t < VOCAB for row in out for t in row)


# ----------------------------------------------------------------------- text


class CharTokenizer:
    """Letters a-z and space as ids 3..29, bos=1, eos=2: enough to exercise generate_text."""

    bos_id, eos_id = 1, 2
    alphabet = "abcdefghijklmnopqrstuvwxyz "

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = [3 + self.alphabet.index(c) for c in text]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return "".join(self.alphabet[i - 3] if 3 <= i < 30 else f"<{i}>" for i in ids)


def test_generate_text_decodes_only_the_continuation(model):
    tok = CharTokenizer()
    texts = ["hello world", "abc"]
    out = generate_text(model, tok, texts, GREEDY)
    ids = generate(model, [tok.encode(t) for t in texts], dataclasses.replace(GREEDY, eos_id=2))
    assert out == [tok.decode(x) for x in ids]
    assert all(isinstance(o, str) for o in out)


def test_generate_text_stops_at_tokenizer_eos(model):
    tok = CharTokenizer()
    free = generate(model, [tok.encode("hello")], GREEDY)[0]
    k = next(i for i, t in enumerate(free) if i >= 1 and t not in free[:i])
    tok.eos_id = free[k]  # instance attribute: this tokenizer's eos is that token
    assert generate_text(model, tok, ["hello"], GREEDY) == [tok.decode(free[:k])]


def test_generate_text_keeps_the_space_before_the_continuation(tmp_path):
    from llamaray.data.sample_text import write_stdlib_sample
    from llamaray.model.generation import _continuation
    from llamaray.tokenizer import train_tokenizer

    sample = write_stdlib_sample(tmp_path / "c", 200_000)
    tok = train_tokenizer([sample["prose"]], tmp_path / "t", vocab_size=600)
    whole = tok.encode("The following is", bos=True)
    prompt = tok.encode("The following", bos=True)
    assert whole[: len(prompt)] == prompt  # the continuation starts with a "▁is"-like piece
    assert tok.decode(whole[len(prompt) :]) == "is"  # what decoding it alone loses
    assert _continuation(tok, prompt, whole[len(prompt) :]) == " is"
