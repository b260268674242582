"""Log-likelihood scoring and greedy generation of `llamaray.eval.lm.LanguageModel`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamaray.data.sample_text import write_stdlib_sample
from llamaray.eval.lm import LanguageModel
from llamaray.model import Llama, get_preset
from llamaray.model.formats import save_hf
from llamaray.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-lm")
    sample = write_stdlib_sample(root / "corpus", 200_000)
    return train_tokenizer([sample["prose"]], root / "tok", vocab_size=600)


@pytest.fixture(scope="module")
def model(tokenizer):
    args = get_preset("debug").args.with_(vocab_size=tokenizer.vocab_size, max_seq_len=48)
    model = Llama(args)
    model.init_weights(seed=3)
    return model.eval()


@pytest.fixture(scope="module")
def lm(model, tokenizer):
    return LanguageModel(model, tokenizer, batch_size=4)


def by_hand(model, context_ids, continuation_ids) -> tuple[float, bool]:
    """The definition: sum over continuation tokens of log_softmax at the position before."""
    tokens = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = F.log_softmax(model(tokens[:, :-1]).float(), -1)[0]
    total, greedy = 0.0, True
    for k, token in enumerate(continuation_ids):
        pos = len(context_ids) - 1 + k
        total += float(logprobs[pos, token])
        greedy &= int(logprobs[pos].argmax()) == token
    return total, greedy


REQUESTS = [
    ("The quick brown fox", " jumps over the lazy dog"),
    ("Question: what is two plus two?\nAnswer:", " four"),
    ("Answer:", " the module"),
    ("", "A whole sentence scored from the beginning."),
    ("Trailing spaces move to the continuation  ", "here"),
]


def test_loglikelihood_is_the_sum_of_continuation_log_probs(lm, model, tokenizer):
    results = lm.loglikelihood(REQUESTS)
    for (context, continuation), result in zip(REQUESTS, results, strict=True):
        ctx_ids, cont_ids = lm.encode_pair(context, continuation)
        assert ctx_ids[0] == tokenizer.bos_id
        assert ctx_ids + cont_ids == tokenizer.encode(context + continuation, bos=True)
        expected, greedy = by_hand(model, ctx_ids, cont_ids)
        assert result.logprob == pytest.approx(expected, abs=1e-4)
        assert result.is_greedy == greedy
        assert result.n_tokens == len(cont_ids) > 0
        assert result.logprob < 0


def test_trailing_context_spaces_join_the_continuation(lm, tokenizer):
    ctx, cont = lm.encode_pair("Answer: ", "yes")
    assert tokenizer.decode(ctx[1:]) == "Answer:"
    # The space starts the answer's first piece (decode alone would drop it: "yes").
    assert tokenizer.id_to_piece(cont[0]).startswith("\u2581")
    assert tokenizer.decode(ctx + cont) == "Answer: yes"


def test_batching_and_padding_do_not_change_scores(model, tokenizer):
    one = LanguageModel(model, tokenizer, batch_size=1).loglikelihood(REQUESTS)
    many = LanguageModel(model, tokenizer, batch_size=8).loglikelihood(REQUESTS)
    for a, b in zip(one, many, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert a.is_greedy == b.is_greedy


def test_greedy_continuation_is_flagged_greedy(lm):
    context = "The quick brown fox"
    generated = lm.generate_until([context], max_new_tokens=6, stop=())[0]
    assert generated
    result = lm.loglikelihood([(context, generated)])[0]
    ctx_ids, cont_ids = lm.encode_pair(context, generated)
    # Re-encoding the decoded text can merge pieces differently; compare on what was scored.
    assert result.is_greedy == by_hand(lm.model, ctx_ids, cont_ids)[1]
    other = lm.loglikelihood([(context, generated + " zebra")])[0]
    assert other.logprob < result.logprob


def test_long_context_is_truncated_from_the_left_keeping_the_continuation(lm, model):
    context_ids = [lm.tokenizer.bos_id, *range(5, 5 + 70)]  # longer than max_length 48
    cont_ids = [7, 8, 9]
    result = lm.loglikelihood_tokens([(context_ids, cont_ids)])[0]
    kept = (context_ids + cont_ids)[-(lm.max_length + 1) :]
    expected, _ = by_hand(model, kept[:-3], cont_ids)
    assert result.n_tokens == 3
    assert result.logprob == pytest.approx(expected, abs=1e-4)


def test_rolling_loglikelihood_scores_every_token_once(lm, model, tokenizer):
    short = "A short text."
    ids = tokenizer.encode(short)
    assert lm.loglikelihood_rolling([short])[0] == pytest.approx(
        by_hand(model, [tokenizer.bos_id], ids)[0], abs=1e-4
    )
    long = " ".join(["the module defines functions and classes"] * 12)  # > one window
    long_ids = tokenizer.encode(long)
    assert len(long_ids) > lm.max_length
    total = lm.loglikelihood_rolling([long, short])
    windows = 0.0
    full = [tokenizer.bos_id, *long_ids]
    for start in range(1, len(full), lm.max_length):
        end = min(start + lm.max_length, len(full))
        context = full[max(0, end - 1 - lm.max_length) : start]
        windows += by_hand(model, context, full[start:end])[0]
    assert total[0] == pytest.approx(windows, abs=1e-3)
    assert total[1] == pytest.approx(lm.loglikelihood_rolling([short])[0], abs=1e-5)


def test_generate_until_cuts_at_the_first_stop_string(lm):
    free = lm.generate_until(["The module"], max_new_tokens=10, stop=())[0]
    assert len(lm.tokenizer.encode(free)) >= 2
    stop = free.strip()[:1]  # a character that certainly occurs in the output
    cut = lm.generate_until(["The module"], max_new_tokens=10, stop=[stop])[0]
    assert cut == free[: free.index(stop)]


def test_empty_continuation_is_an_error(lm):
    with pytest.raises(ValueError, match="request 0: the continuation is empty"):
        lm.loglikelihood([("context", "")])


def test_from_pretrained_loads_an_exported_folder(model, tokenizer, tmp_path):
    out = save_hf(model, tmp_path / "hf")
    (out / "tokenizer.model").write_bytes(tokenizer.path.read_bytes())
    loaded = LanguageModel.from_pretrained(out, device="cpu")
    a = loaded.loglikelihood(REQUESTS[:2])
    b = LanguageModel(model, tokenizer).loglikelihood(REQUESTS[:2])
    assert [r.logprob for r in a] == pytest.approx([r.logprob for r in b], abs=1e-5)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        LanguageModel.from_pretrained(tmp_path / "elsewhere")
