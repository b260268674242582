"""Meta and Hugging Face checkpoint formats (`llamaray.model.formats`).

Logits are compared with transformers' own `LlamaForCausalLM` on the same weights, in both
directions; round trips must be bit-exact. Weights are drawn large enough (not the 0.02
init) that attention is far from uniform, so a wrong rotary permutation or a swapped
projection moves the logits by orders of magnitude more than the 1e-5 tolerance (checked
by `test_tolerance_catches_a_missing_permutation`).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llamaray.model import formats
from llamaray.model.args import ModelArgs
from llamaray.model.formats import convert, load_pretrained, save_hf, save_meta
from llamaray.model.llama import Llama, precompute_rope

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

ATOL = 1e-5

# Our architectures: MHA, and GQA with a non-default rope theta and ffn multiplier.
OUR_CONFIGS = {
    "mha": ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=97, multiple_of=32, max_seq_len=64),
    "gqa": ModelArgs(
        dim=64,
        n_layers=2,
        n_heads=8,
        n_kv_heads=2,
        vocab_size=97,
        multiple_of=16,
        ffn_dim_multiplier=1.3,
        rope_theta=500000.0,
        max_seq_len=48,
    ),
}

# Hugging Face architectures, including what only a foreign checkpoint would have: MQA,
# tied embeddings and an intermediate_size no LLaMA preset produces.
HF_CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, intermediate_size=192),
    "gqa": dict(
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=176,
        rope_parameters={"rope_theta": 500000.0, "rope_type": "default"},
    ),
    "mqa_tied_odd_ffn": dict(
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=100,
        tie_word_embeddings=True,
    ),
}

SHAPES = [(1, 7), (3, 33), (3, 7), (1, 33)]


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Weights of std 0.1 and norm gains around 1 (not all ones), from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if p.ndim == 1:  # RMSNorm gains
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)


def _our_model(name: str, seed: int = 0) -> Llama:
    model = Llama(OUR_CONFIGS[name])
    _randomize(model, seed)
    return model.eval()


def _hf_model(name: str, seed: int = 0, vocab_size: int = 97) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        max_position_embeddings=40,
        rms_norm_eps=1e-5,
        **HF_CONFIGS[name],
    )
    model = LlamaForCausalLM(config)
    _randomize(model, seed)
    return model.eval()


def _tokens(batch: int, seq: int, vocab: int = 97) -> torch.Tensor:
    gen = torch.Generator().manual_seed(batch * 1000 + seq)
    return torch.randint(0, vocab, (batch, seq), generator=gen)


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


# ---------------------------------------------------------------------------- logits vs HF


@pytest.fixture(scope="module")
def saved_ours(tmp_path_factory) -> dict[str, tuple[Llama, Path]]:
    out = {}
    for name in OUR_CONFIGS:
        model = _our_model(name)
        out[name] = (model, save_hf(model, tmp_path_factory.mktemp(f"ours-{name}")))
    return out


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(OUR_CONFIGS))
@torch.no_grad()
def test_our_model_matches_transformers(saved_ours, name, attn):
    model, folder = saved_ours[name]
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn)
    assert hf.config.num_key_value_heads == model.args.kv_heads
    assert hf.config.intermediate_size == model.args.ffn_hidden_dim
    for batch, seq in SHAPES:
        tokens = _tokens(batch, seq)
        ours = model(tokens)
        theirs = hf(input_ids=tokens).logits
        assert theirs.shape == ours.shape == (batch, seq, 97)
        assert ours.abs().max() > 0.5  # logits of real size: the tolerance means something
        torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("name", list(HF_CONFIGS))
@torch.no_grad()
def test_transformers_model_loads_with_same_logits(tmp_path, name, backend):
    hf = _hf_model(name)
    hf.save_pretrained(tmp_path)
    model = Llama.from_pretrained(tmp_path, attention_backend=backend)
    assert model.args.dim == 64 and model.args.kv_heads == hf.config.num_key_value_heads
    assert model.args.ffn_hidden_dim == hf.config.intermediate_size
    assert model.args.max_seq_len == 40
    for batch, seq in SHAPES:
        tokens = _tokens(batch, seq)
        torch.testing.assert_close(model(tokens), hf(input_ids=tokens).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_tolerance_catches_a_missing_permutation(tmp_path, monkeypatch):
    """The logit comparisons above would fail if the q/k rotary permutation were skipped."""
    model = _our_model("gqa")
    # meta_to_hf_state_dict looks hf_permute up in formats.hf, where it is defined.
    monkeypatch.setattr(formats.hf, "hf_permute", lambda w, n_heads: w)
    save_hf(model, tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    tokens = _tokens(3, 33)
    assert (model(tokens) - hf(input_ids=tokens).logits).abs().max() > 100 * ATOL


@torch.no_grad()
def test_sharded_safetensors_with_index(tmp_path):
    hf = _hf_model("gqa", seed=3)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    model = load_pretrained(tmp_path)
    tokens = _tokens(3, 33)
    torch.testing.assert_close(model(tokens), hf(input_ids=tokens).logits, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", list(OUR_CONFIGS))
def test_hf_round_trip_is_bit_exact(tmp_path, name):
    model = _our_model(name, seed=1)
    loaded = load_pretrained(save_hf(model, tmp_path))
    assert loaded.args == model.args
    assert _state_equal(model.state_dict(), loaded.state_dict())


def test_hf_round_trip_keeps_or_casts_dtype(tmp_path):
    model = _our_model("mha", seed=1)
    save_hf(model, tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load_pretrained(tmp_path)  # dtype None keeps the checkpoint's
    assert loaded.tok_embeddings.weight.dtype == torch.bfloat16
    assert _state_equal(model.to(torch.bfloat16).state_dict(), loaded.state_dict())
    as_fp32 = load_pretrained(tmp_path, dtype=torch.float32)
    assert as_fp32.output.weight.dtype == torch.float32
    assert as_fp32.freqs_cis.dtype == torch.complex64


@pytest.mark.parametrize("name", list(OUR_CONFIGS))
def test_meta_round_trip_one_and_two_shards(tmp_path, name):
    args = OUR_CONFIGS[name].with_(vocab_size=98)  # Meta splits the output rows across ranks
    model = Llama(args)
    _randomize(model, 2)
    one = load_pretrained(save_meta(model, tmp_path / "one"))
    two_dir = save_meta(model, tmp_path / "two", num_shards=2)
    # The shards really are split the way Meta's model parallelism splits them.
    shard = torch.load(two_dir / "consolidated.01.pth", weights_only=True)
    assert shard["layers.0.attention.wq.weight"].shape == (32, 64)  # rows
    assert shard["layers.0.attention.wo.weight"].shape == (64, 32)  # columns
    assert shard["tok_embeddings.weight"].shape == (98, 32)  # embedding dim
    assert shard["output.weight"].shape == (49, 64)
    assert torch.equal(shard["norm.weight"], model.norm.weight.detach())  # replicated
    two = load_pretrained(two_dir)
    assert one.args == two.args == args
    assert _state_equal(model.state_dict(), one.state_dict())
    assert _state_equal(one.state_dict(), two.state_dict())


def test_meta_shards_with_disagreeing_norms_are_refused(tmp_path):
    model = Llama(OUR_CONFIGS["mha"].with_(vocab_size=98))
    save_meta(model, tmp_path, num_shards=2)
    shard = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    shard["layers.1.ffn_norm.weight"] = shard["layers.1.ffn_norm.weight"] + 1
    torch.save(shard, tmp_path / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"replicated tensor 'layers\.1\.ffn_norm\.weight'"):
        load_pretrained(tmp_path)


def test_hf_to_meta_to_hf_is_bit_exact(tmp_path):
    hf = _hf_model("gqa", seed=4, vocab_size=98)  # divisible by the two Meta shards
    hf.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "meta", to="meta", num_shards=2)
    assert sorted(p.name for p in (tmp_path / "meta").glob("consolidated.*")) == [
        "consolidated.00.pth",
        "consolidated.01.pth",
    ]
    convert(tmp_path / "meta", tmp_path / "back", to="hf")
    original = load_file(tmp_path / "hf" / "model.safetensors")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert _state_equal(original, back)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["intermediate_size"] == 176 and config["num_key_value_heads"] == 2
    assert config["rope_parameters"]["rope_theta"] == 500000.0


def test_meta_to_hf_keeps_our_ffn_rule(tmp_path):
    """config.json carries multiple_of / ffn_dim_multiplier, so ModelArgs survive HF exactly."""
    model = _our_model("mha")
    convert(save_meta(model, tmp_path / "meta"), tmp_path / "hf", to="hf")
    loaded = load_pretrained(tmp_path / "hf")
    assert loaded.args == model.args and loaded.args.multiple_of == 32


def test_llama1_checkpoint_with_vocab_minus_one_and_rope_freqs(tmp_path):
    model = _our_model("mha", seed=5)
    save_meta(model, tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    params["vocab_size"] = -1
    del params["rope_theta"], params["max_seq_len"]
    (tmp_path / "params.json").write_text(json.dumps(params))
    state = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    state["rope.freqs"] = torch.randn(8)
    torch.save(state, tmp_path / "consolidated.00.pth")
    loaded = load_pretrained(tmp_path, max_seq_len=64)
    assert loaded.args.vocab_size == 97 and loaded.args.rope_theta == 10000.0
    assert _state_equal(model.state_dict(), loaded.state_dict())
    tokens = _tokens(3, 33)
    assert torch.equal(model(tokens), loaded(tokens))


def test_loaded_model_is_materialized_with_rope_tables(tmp_path):
    model = _our_model("gqa")
    loaded = load_pretrained(save_hf(model, tmp_path), attention_backend="reference")
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert all(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded.freqs_cis, precompute_rope(8, 48, 500000.0))
    assert loaded.layers["0"].attention.backend == "reference"


def test_transformers_4_style_config_is_read(tmp_path):
    model = _our_model("gqa")
    save_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("rope_parameters", "llamaray", "dtype"):
        del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_pretrained(tmp_path)
    assert loaded.args.rope_theta == 500000.0
    assert loaded.args.ffn_hidden_dim == model.args.ffn_hidden_dim
    assert _state_equal(model.state_dict(), loaded.state_dict())


@pytest.mark.parametrize(
    "dim, intermediate",
    [(4096, 11008), (5120, 13824), (8192, 28672), (4096, 14336), (2048, 8192), (64, 100)],
)
def test_ffn_rule_is_found_for_known_widths(dim, intermediate):
    config = dict(
        model_type="llama",
        hidden_size=dim,
        intermediate_size=intermediate,
        num_attention_heads=dim // 64,
        num_hidden_layers=1,
        vocab_size=10,
    )
    assert formats.args_from_hf_config(config).ffn_hidden_dim == intermediate


# ---------------------------------------------------------------------------- errors


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no LLaMA checkpoint") as err:
        load_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value) and "params.json" in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")


def test_folder_with_both_formats_is_refused(tmp_path):
    save_hf(_our_model("mha"), tmp_path)
    (tmp_path / "params.json").write_text("{}")
    with pytest.raises(ValueError, match=r"both params\.json"):
        load_pretrained(tmp_path)


def test_wrong_model_type_is_refused(tmp_path):
    save_hf(_our_model("mha"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "mistral"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model_type='mistral'.*only Hugging Face 'llama'"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling type 'llama3'"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope scaling type 'linear'"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"head_dim": 32}, "head_dim=32"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ],
)
def test_unsupported_hf_configs_are_refused(tmp_path, change, message):
    save_hf(_our_model("mha"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_pretrained(tmp_path)


def test_missing_hf_tensor_is_named(tmp_path):
    save_hf(_our_model("mha"), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    tensors["model.layers.1.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        load_pretrained(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message
    assert "missing tensors layers.1.attention.wk.weight" in message
    assert "unexpected tensors model.layers.1.self_attn.extra.weight" in message


def test_missing_meta_tensor_is_named(tmp_path):
    save_meta(_our_model("mha"), tmp_path)
    state = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    del state["layers.0.feed_forward.w2.weight"]
    torch.save(state, tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"missing tensors layers\.0\.feed_forward\.w2\.weight"):
        load_pretrained(tmp_path)


def test_shape_mismatch_is_named(tmp_path):
    save_meta(_our_model("mha"), tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    params["n_layers"], params["vocab_size"] = 2, 101
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(
        ValueError,
        match=r"wrong shape: tok_embeddings\.weight: checkpoint "
        r"\(97, 64\) vs model \(101, 64\)",
    ):
        load_pretrained(tmp_path)


def test_missing_weights_file_is_refused(tmp_path):
    save_hf(_our_model("mha"), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"config.json but no weights"):
        load_pretrained(tmp_path)


def test_writing_over_another_checkpoint_is_refused(tmp_path):
    model = _our_model("mha")
    save_hf(model, tmp_path)
    with pytest.raises(FileExistsError, match=r"config\.json"):
        save_meta(model, tmp_path)


# ---------------------------------------------------------------------------- pickle safety


class _Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    model = _our_model("mha")
    save_meta(model, tmp_path)
    marker = tmp_path / "pwned"
    state = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    state["evil"] = _Payload(marker)
    torch.save(state, tmp_path / "consolidated.00.pth")

    with pytest.raises(pickle.UnpicklingError, match=r"[Ww]eights only load failed"):
        load_pretrained(tmp_path)
    assert not marker.exists()
    # The payload is real: an unrestricted load would have run it.
    torch.load(tmp_path / "consolidated.00.pth", weights_only=False)
    assert marker.read_text() == "pwned"


def test_torch_load_is_always_weights_only(tmp_path, monkeypatch):
    save_meta(Llama(OUR_CONFIGS["mha"].with_(vocab_size=98)), tmp_path, num_shards=2)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_pretrained(tmp_path)
    assert len(calls) == 2
    assert all(call.get("weights_only") is True for call in calls)
    assert all(call.get("mmap") is True for call in calls)
