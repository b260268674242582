"""Instruction finetuning without Ray: reading JSONL (errors by file:line and field), the
prompt template, masking prompt tokens out of the loss, truncation counts, token-weighted
accumulation, the instruction feed, resolving and checking the base model, and the real
training worker finetuning in this process (one gloo rank) from a base model folder and
from a checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llamaray.cli import main
from llamaray.config import ConfigError, load_config
from llamaray.data.instructions import (
    IGNORE_INDEX,
    Example,
    InstructionDataError,
    Template,
    batch_indices,
    encode_examples,
    read_examples,
    split_examples,
)
from llamaray.data.sample_text import write_stdlib_sample
from llamaray.finetune.base import check_architecture, resolve_base
from llamaray.finetune.driver import prepare_finetune
from llamaray.model import Llama, get_preset
from llamaray.model.formats import save_hf
from llamaray.model.loss import IGNORE_INDEX as LOSS_IGNORE_INDEX
from llamaray.tokenizer import train_tokenizer
from llamaray.train.batches import InstructionFeed
from llamaray.train.launcher import LocalLauncher
from llamaray.train.optim import build_optimizer
from llamaray.train.step import train_step
from llamaray.train.worker import WorkerSpec, run_worker

SEQ_LEN = 96


def write_jsonl(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_examples(n: int) -> list[dict]:
    """Counting and bracketing, alternately: patterns a debug model picks up in a few steps."""
    out = []
    for i in range(n):
        if i % 2:
            out.append({"instruction": f"Count from {i % 7} to {i % 7 + 3}.",
                        "response": " ".join(str(k) for k in range(i % 7, i % 7 + 4))})  # fmt: skip
        else:
            out.append({"instruction": "Put the word in brackets.", "input": f"w{i}",
                        "response": f"[w{i}]"})  # fmt: skip
    return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("instructions-tok")
    sample = write_stdlib_sample(root / "corpus", 200_000)
    return train_tokenizer([sample["prose"]], root / "tok", vocab_size=512)


@pytest.fixture(scope="module")
def base_folder(tokenizer, tmp_path_factory):
    """A debug-preset model in Hugging Face format with its tokenizer: a finetune's base."""
    model = Llama(get_preset("debug").args.with_(vocab_size=tokenizer.vocab_size))
    model.init_weights(seed=7)
    folder = save_hf(model, tmp_path_factory.mktemp("base") / "hf")
    (folder / "tokenizer.model").write_bytes(Path(tokenizer.path).read_bytes())
    return folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", make_examples(40))


def finetune_config(root: Path, base: Path | str, train_file: Path, *overrides: str):
    return load_config(
        None,
        [
            "name=sft",
            f"output_dir={root}",
            "model.preset=debug",
            f"finetune.base={base}",
            f"finetune.train_file={train_file}",
            "finetune.validation_fraction=0.2",
            "optimizer.lr=3e-3",
            "optimizer.warmup_steps=2",
            "train.steps=8",
            f"train.seq_len={SEQ_LEN}",
            f"train.batch_tokens={8 * SEQ_LEN}",  # 8 examples: 2 micro-batches of 4
            "train.micro_batch_size=4",
            "train.num_workers=1",
            "train.device=cpu",
            "train.log_every=1",
            "train.checkpoint_every=4",
            "tracking.enabled=false",
            "tracking.export_hf=false",
            *overrides,
        ],
    )


# ------------------------------------------------------------------------------ reading


def test_ignore_index_is_the_losses():
    assert IGNORE_INDEX == LOSS_IGNORE_INDEX


def test_reads_examples_with_optional_input_and_extra_keys(tmp_path):
    path = write_jsonl(
        tmp_path / "ok.jsonl",
        [
            {"instruction": "a", "response": "b", "id": 7},
            "",
            {"instruction": "c", "input": "d", "response": "e"},
        ],
    )
    assert read_examples(path) == [
        Example("a", "b", "", f"{path}:1"),
        Example("c", "e", "d", f"{path}:3"),
    ]


def test_every_bad_line_is_named_with_its_field(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"instruction": "fine", "response": "ok"},
            {"instruction": "no response"},
            {"instruction": "x", "input": 3, "response": "y"},
            '{"instruction": "broken", ',
            '["a list"]',
            {"instruction": "  ", "response": "y"},
        ],
    )
    with pytest.raises(InstructionDataError) as err:
        read_examples(path)
    message = str(err.value)
    assert message.startswith(f"5 bad line(s) in {path}")
    for expected in (
        f"{path}:2: response: missing",
        f"{path}:3: input: must be a string, got int",
        f"{path}:4: not valid JSON",
        f"{path}:5: expected a JSON object",
        f"{path}:6: instruction: empty",
    ):
        assert expected in message, expected
    assert f"{path}:1" not in message


def test_missing_empty_and_non_utf8_files(tmp_path):
    with pytest.raises(InstructionDataError, match="no such file"):
        read_examples(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InstructionDataError, match="no examples"):
        read_examples(tmp_path / "empty.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"instruction": "caf\xe9", "response": "x"}\n')
    with pytest.raises(InstructionDataError, match=r"latin1.jsonl:1: not UTF-8"):
        read_examples(tmp_path / "latin1.jsonl")


def test_split_is_seeded_disjoint_and_keeps_order():
    examples = [Example(str(i), "r") for i in range(50)]
    train, held = split_examples(examples, 0.2, seed=3)
    assert len(held) == 10 and len(train) == 40
    assert sorted(e.instruction for e in train + held) == sorted(str(i) for i in range(50))
    assert held == split_examples(examples, 0.2, seed=3)[1]
    assert held != split_examples(examples, 0.2, seed=4)[1]
    assert [int(e.instruction) for e in held] == sorted(int(e.instruction) for e in held)
    assert split_examples(examples[:3], 0.01, seed=0)[1] != []  # at least one held out


# ------------------------------------------------------------------------ config checks


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "finetune.template='Q: {question}'",
            "finetune.template: has no {instruction}; has unknown placeholder(s) {question}",
        ),
        ("finetune.template_with_input='{instruction}'", "template_with_input: has no {input}"),
        ("finetune.train_file=' '", "finetune.train_file: must not be empty"),
        ("finetune.validation_fraction=1", "finetune.validation_fraction"),
        ("optimizer.lr=null", "optimizer.lr: set a finetuning learning rate"),
        ("optimizer.warmup_steps=8", "optimizer.warmup_steps: 8 is not below train.steps=8"),
        ("finetune.bogus=1", "finetune.bogus: unknown key"),
    ],
)
def test_config_errors_name_the_field(tmp_path, override, expected):
    with pytest.raises(ConfigError) as err:
        finetune_config(tmp_path, "base", tmp_path / "t.jsonl", override)
    assert expected in str(err.value)


def test_template_renders_with_and_without_input():
    template = Template("Q: {instruction}\nA:", "Q: {instruction} [{input}]\nA: {{ok}}")
    assert template.render_prompt(Example("sum", "4")) == "Q: sum\nA:"
    assert template.render_prompt(Example("sum", "4", "2 2")) == "Q: sum [2 2]\nA: {ok}"


# ----------------------------------------------------------------------------- masking


def test_prompt_tokens_carry_no_loss(tokenizer):
    template = Template()
    examples = [
        Example("Count from 3 to 6.", "3 4 5 6"),
        Example("Put the word in brackets.", "[river]", "river"),
    ]
    encoded = encode_examples(examples, tokenizer, template, SEQ_LEN)
    inputs, targets = encoded.micro_batch([0, 1], multiple=8)
    assert inputs.shape == targets.shape and inputs.shape[1] % 8 == 0
    for row, example in enumerate(examples):
        prompt = tokenizer.encode(template.render_prompt(example), bos=True)
        response = tokenizer.encode(example.response, eos=True)
        n = len(prompt) + len(response)
        assert inputs[row, :n - 1].tolist() == (prompt + response)[:-1]  # fmt: skip
        # Targets: nothing on the prompt, the response and </s> after it, nothing on padding.
        assert (targets[row, : len(prompt) - 1] == IGNORE_INDEX).all()
        assert targets[row, len(prompt) - 1 : n - 1].tolist() == response
        assert (targets[row, n - 1 :] == IGNORE_INDEX).all()
    assert encoded.response_tokens.tolist() == [
        len(tokenizer.encode(e.response, eos=True)) for e in examples
    ]

    # The model's loss is the cross-entropy of the response positions alone.
    model = Llama(get_preset("debug").args.with_(vocab_size=tokenizer.vocab_size))
    model.init_weights(seed=1)
    x, y = torch.from_numpy(inputs), torch.from_numpy(targets)
    with torch.no_grad():
        loss = model(x, targets=y)
        logits = model(x)
    learned = y != IGNORE_INDEX
    expected = F.cross_entropy(logits[learned].float(), y[learned])
    everything = F.cross_entropy(logits.flatten(0, 1).float(), x.roll(-1, 1).flatten())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(loss.item() - everything.item()) > 1e-3  # the prompt would change it


def test_truncated_and_dropped_examples_are_counted(tokenizer):
    long_response = Example("Say it.", " ".join(["river"] * 60), origin="f:1")
    long_prompt = Example("Read this: " + "stone " * 80, "ok", origin="f:2")
    fits = Example("Say it.", "river", origin="f:3")
    short = Template("Q: {instruction}\nA:", "Q: {instruction} {input}\nA:")
    encoded = encode_examples([long_response, long_prompt, fits], tokenizer, short, 32)
    assert (len(encoded), encoded.truncated, encoded.dropped) == (2, 1, ["f:2"])
    assert encoded.lengths[0] == 33  # cut to seq_len + 1 tokens
    _, targets = encoded.micro_batch([0])
    assert targets.shape == (1, 32) and targets[0, -1] != tokenizer.eos_id
    _, targets = encoded.micro_batch([1])
    assert targets[0, encoded.lengths[1] - 2] == tokenizer.eos_id
    assert encoded.stats()["dropped"] == 1


# ------------------------------------------------------------------- the training step


def test_micro_batches_weigh_by_their_response_tokens():
    """Accumulating micro-batches with different numbers of learned tokens gives the loss
    and gradient of one batch: the mean over all learned tokens, not a mean of means."""
    vocab, g = 97, torch.Generator().manual_seed(0)
    inputs = torch.randint(0, vocab, (4, 12), generator=g)
    targets = torch.randint(0, vocab, (4, 12), generator=g)
    targets[0, :10] = IGNORE_INDEX  # 2 learned tokens in the first example, 12 in the others
    args = get_preset("debug").args.with_(vocab_size=vocab)
    a, b = Llama(args), Llama(args)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        first, rest = a(inputs[:1], targets=targets[:1]), a(inputs[1:], targets=targets[1:])
    mean_of_means = (first + rest).item() / 2
    one = train_step(a, build_optimizer(a, 1e-3), [(inputs, targets)], lr=1e-3)
    split = train_step(
        b, build_optimizer(b, 1e-3), [(inputs[:1], targets[:1]), (inputs[1:], targets[1:])], 1e-3
    )
    assert split.loss == pytest.approx(one.loss, rel=1e-5)
    assert abs(split.loss - mean_of_means) > 0.01
    assert split.grad_norm == pytest.approx(one.grad_norm, rel=1e-4)
    assert one.tokens == split.tokens == 2 + 3 * 12
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="mixes"):
        train_step(a, build_optimizer(a, 1e-3), [inputs, (inputs, targets)], lr=1e-3)


# ------------------------------------------------------------------------------ the feed


def test_instruction_feed_is_a_function_of_the_step_and_rank(tokenizer, tmp_path, data_file):
    cfg = finetune_config(
        tmp_path, "base", data_file, "train.num_workers=2", "train.steps=12",
        "train.micro_batch_size=2",
    )  # fmt: skip
    examples = [Example(**e) for e in make_examples(21)]
    train = encode_examples(examples[:16], tokenizer, Template(), SEQ_LEN)
    val = encode_examples(examples[16:], tokenizer, Template(), SEQ_LEN)  # 5 held out
    feed = InstructionFeed(
        cfg, {"train": train.to_dict(), "validation": val.to_dict(), "vocab_size": 512}
    )
    ranks = [list(feed.batches(rank, 2, start_step=0)) for rank in range(2)]
    assert len(ranks[0]) == 12  # 16 examples, 8 a step: 2 steps an epoch, 6 epochs
    for step in range(12):
        chosen = batch_indices(16, 8, step, cfg.train.seed)
        assert ranks[0][step].tokens == int(train.response_tokens[chosen].sum())
        seen = []
        for rank in range(2):
            micro = ranks[rank][step].micro_batches
            assert len(micro) == 2 and all(len(x) == 2 for x, _ in micro)  # 4 = 2 x 2 a rank
            seen += [int((t != IGNORE_INDEX).sum()) for _, t in micro]
        assert sum(seen) == ranks[0][step].tokens
    resumed = next(iter(feed.batches(1, 2, start_step=5)))
    assert resumed.fingerprint == ranks[1][5].fingerprint
    for (x, y), (rx, ry) in zip(ranks[1][5].micro_batches, resumed.micro_batches, strict=True):
        assert np.array_equal(x, rx) and np.array_equal(y, ry)

    # Validation: equal forwards per rank, every held-out response token counted once.
    per_rank = [feed.validation_batches(rank, 2, micro=2)["responses"] for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2  # 3 rows a rank (one is filler)
    counted = sum(int((t != IGNORE_INDEX).sum()) for part in per_rank for _, t in part)
    assert counted == int(val.response_tokens.sum())


# ------------------------------------------------------------------------------ the base


def test_base_folder_and_architecture_are_checked(base_folder, tokenizer, tmp_path, data_file):
    cfg = finetune_config(tmp_path, base_folder, data_file)
    base = resolve_base(cfg)
    assert (base.kind, base.path, base.run_name) == ("folder", str(base_folder), None)
    assert check_architecture(cfg, base, tokenizer.vocab_size) == tokenizer.vocab_size

    wider = finetune_config(tmp_path, base_folder, data_file, "model.dim=128", "model.n_heads=4")
    with pytest.raises(ConfigError) as err:
        check_architecture(wider, base, tokenizer.vocab_size)
    assert "not the base's architecture" in str(err.value)
    assert "tok_embeddings.weight: (512, 64) in the base, (512, 128) here" in str(err.value)
    with pytest.raises(ConfigError, match=r"finetune\.tokenizer: 600 pieces"):
        check_architecture(cfg, base, 600)

    with pytest.raises(ConfigError, match="no run of that name has checkpoints"):
        resolve_base(finetune_config(tmp_path, "no-such-run", data_file))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_base(finetune_config(tmp_path, tmp_path / "nowhere", data_file))
    with pytest.raises(ConfigError, match="neither a checkpoint"):
        resolve_base(finetune_config(tmp_path, tmp_path, data_file))


def test_bad_data_fails_before_ray_with_file_and_line(base_folder, tmp_path, capsys, monkeypatch):
    # Ray may already be up in this session (tests/ray runs first): watch the one place
    # the driver joins or starts a cluster instead of asking whether Ray is initialized.
    import llamaray.ray_session

    joined = []
    monkeypatch.setattr(llamaray.ray_session, "start_ray", lambda: joined.append(True))
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"instruction": "a", "response": "b"}, {"instruction": "c"}]
    )
    args = ["finetune", f"output_dir={tmp_path}", "model.preset=debug", "train.seq_len=64"]
    code = main(
        [
            *args,
            f"finetune.base={base_folder}",
            f"finetune.train_file={bad}",
            "optimizer.lr=1e-3",
            "optimizer.warmup_steps=1",
            "train.steps=4",
            "tracking.enabled=false",
        ]
    )
    assert code == 2
    assert f"{bad}:2: response: missing" in capsys.readouterr().err
    assert not joined
    code = main(args)
    assert code == 2 and "no finetune section" in capsys.readouterr().err


# --------------------------------------------------- the worker, in process (no Ray)


def finetune_in_process(cfg) -> tuple:
    """What `finetune.driver.finetune` does, with run_worker in this process."""
    plan = prepare_finetune(cfg)
    root = Path(cfg.output_dir)
    spec = WorkerSpec(cfg.model_dump(), "", str(root / cfg.name), base=plan.base.spec(),
                      instructions=plan.instructions())  # fmt: skip
    launcher = LocalLauncher(root / "checkpoints" / cfg.name)
    return run_worker(spec, launcher), launcher, plan.data


def heldout_loss(model: Llama, data) -> float:
    """The response loss of a plain (unsharded) model on the held-out examples."""
    inputs, targets = data.validation.micro_batch(range(len(data.validation)))
    with torch.no_grad():
        return model(torch.from_numpy(inputs), targets=torch.from_numpy(targets)).item()


@pytest.fixture(scope="module")
def in_process(process_group, base_folder, data_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    return finetune_in_process(finetune_config(root, base_folder, data_file)), root


def test_worker_starts_from_the_base_and_learns_the_responses(in_process, base_folder):
    (result, launcher, data), _root = in_process
    reports = {r["step"]: r for r in launcher.reports}
    # Step 0 is measured before any update: the base model's own held-out response loss.
    base_loss = heldout_loss(Llama.from_pretrained(base_folder), data)
    assert reports[0]["val_loss"] == pytest.approx(base_loss, rel=1e-4)
    assert sorted(reports) == list(range(9)) and result.step == 8
    assert result.last["val_loss"] < 0.8 * reports[0]["val_loss"]
    assert all(math.isfinite(reports[s]["loss"]) for s in range(1, 9))
    # Throughput counts response tokens: 8 examples of a few response tokens a step.
    per_step = [r["tokens_per_s"] * r["step_time_s"] for s, r in reports.items() if s]
    assert all(8 <= t < 8 * 16 for t in per_step), per_step


def test_finetune_from_a_checkpoint_and_resume(in_process, base_folder, data_file, tmp_path):
    (first, _launcher, _data), root = in_process
    step_dir = root / "checkpoints" / "sft" / "step-00000008"
    assert step_dir.is_dir()

    def config(name: str, *extra: str):
        tokenizer = base_folder / "tokenizer.model"  # no MLflow here to take it from
        return finetune_config(tmp_path, step_dir, data_file, f"name={name}",
                               f"finetune.tokenizer={tokenizer}", *extra)  # fmt: skip

    assert resolve_base(config("again")).run_name == "sft"
    paused, launcher, _ = finetune_in_process(config("again", "train.stop_at_step=3"))
    assert paused.step == 3
    # It starts from exactly the weights the first finetune ended with.
    assert launcher.reports[0]["val_loss"] == pytest.approx(first.last["val_loss"], rel=1e-5)
    # A relaunch resumes its own checkpoint (no step 0 again) and matches a straight run.
    resumed, launcher_b, _ = finetune_in_process(config("again"))
    assert resumed.step == 8
    assert [r["step"] for r in launcher_b.reports] == [4, 5, 6, 7, 8]
    _, straight, _ = finetune_in_process(config("straight"))
    expected = {r["step"]: r["loss"] for r in straight.reports if r["step"]}
    for report in launcher.reports[1:] + launcher_b.reports:
        assert report["loss"] == expected[report["step"]], report["step"]  # bit for bit


def test_base_train_file_and_tokenizer_on_s3_load_on_the_rank(
    in_process, base_folder, data_file, tmp_path, s3_client
):
    """No shared disk: the base (a run name under S3 storage, a step folder or a model
    folder by URI), the instruction file and the tokenizer are all read from S3; a rank
    fetches the base onto its own disk and gets exactly the weights that were saved."""
    from llamaray import storage
    from llamaray.eval.checkpoint import load_dcp_model
    from llamaray.train.base_weights import load_base_weights

    (_first, _launcher, _data), root = in_process
    s3_client.create_bucket(Bucket="ft-base")
    step_dir = root / "checkpoints" / "sft" / "step-00000008"
    step_uri = "s3://ft-base/checkpoints/sft/step-00000008"
    storage.upload(step_dir, step_uri)
    storage.upload(base_folder, "s3://ft-base/models/base")
    storage.upload(data_file, "s3://ft-base/data/train.jsonl")
    on_s3 = [
        "storage=s3://ft-base/checkpoints",
        "finetune.tokenizer=s3://ft-base/models/base/tokenizer.model",
    ]
    cfg = finetune_config(tmp_path, "sft", "s3://ft-base/data/train.jsonl", *on_s3)
    plan = prepare_finetune(cfg)  # the run name, found under the S3 storage
    assert (plan.base.kind, plan.base.path, plan.base.run_name) == ("checkpoint", step_uri, "sft")
    assert plan.base.step == 8 and plan.tokenizer_path == on_s3[1].split("=", 1)[1]
    assert plan.instructions()["tokenizer_path"].startswith("s3://")
    assert len(plan.data.train) + len(plan.data.validation) == 40
    # A tokenizer on the driver's disk only: the ranks get the driver's copy in S3 storage.
    local_tokenizer = base_folder / "tokenizer.model"
    driver_only = finetune_config(
        tmp_path, "sft", data_file, on_s3[0], f"finetune.tokenizer={local_tokenizer}"
    )
    copied = prepare_finetune(driver_only).instructions()["tokenizer_path"]
    assert copied == "s3://ft-base/checkpoints/sft/base-tokenizer/tokenizer.model"
    assert storage.read_bytes(copied) == local_tokenizer.read_bytes()
    assert resolve_base(finetune_config(tmp_path, step_uri, data_file, *on_s3)).step == 8
    folder = resolve_base(finetune_config(tmp_path, "s3://ft-base/models/base", data_file))
    assert (folder.kind, folder.path) == ("folder", "s3://ft-base/models/base")
    assert check_architecture(cfg, folder, 512) == 512

    model = Llama(cfg.model.args(512))
    load_base_weights(model, plan.base.spec())
    expected = load_dcp_model(step_dir, cfg).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    load_base_weights(model, folder.spec())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, Llama.from_pretrained(base_folder).state_dict()[name]), name

    # A truncated object in S3 is found from its size alone, before anything is fetched.
    shard = next(n for n in storage.list_files(step_uri) if n.endswith(".distcp"))
    s3_client.put_object(Bucket="ft-base", Key=f"checkpoints/sft/step-00000008/{shard}", Body=b"x")
    with pytest.raises(ConfigError, match="truncated"):
        resolve_base(finetune_config(tmp_path, step_uri, data_file, *on_s3))
