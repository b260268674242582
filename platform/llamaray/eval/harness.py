"""lm-evaluation-harness on our checkpoints: a harness `LM` that scores with our own
`LanguageModel`, so `llamaray eval` and the harness's standard suites read one model the
same way.

    >>> import lm_eval, llamaray.eval.harness  # doctest: +SKIP  (registers "llamaray")
    >>> lm_eval.simple_evaluate(model="llamaray", model_args="pretrained=runs/checkpoints/demo/hf",
    ...                         tasks=["arc_easy"])  # doctest: +SKIP

or from the shell, `llamaray harness --model runs/checkpoints/demo/hf --tasks arc_easy` (a
folder), or `llamaray harness --config jobs/configs/demo.yaml --tasks arc_easy` (a training run's
newest complete checkpoint, results into MLflow under the run as `llamaray eval` does).

The harness's tasks fetch their data from the Hugging Face Hub unless it is cached
(`HF_DATASETS_OFFLINE=1` to insist on the cache) or the task reads local files
(`dataset_path: json` with `data_files`, through `--include-path`).

Why an adapter and not the harness's own `hf` model on an exported folder: that path reads
our SentencePiece model through transformers' Llama tokenizer, which encodes text that
starts with whitespace, or holds a literal "▁", differently from SentencePiece itself; here
every request goes through the tokenizer the model was trained with.

Requires the `harness` extra (`pip install 'llamaray[harness]'`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

try:
    import lm_eval.models  # noqa: F401  (the harness's own models, registered first)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the lm-evaluation-harness adapter needs lm-eval: pip install 'llamaray[harness]'"
    ) from err

from llamaray.console import logger
from llamaray.eval.checkpoint import EvalTarget, folder_target
from llamaray.eval.lm import LanguageModel

MODEL_NAME = "llamaray"
DEFAULT_MAX_GEN_TOKS = 256


@register_model(MODEL_NAME)
class HarnessLM(LM):
    """lm-evaluation-harness's model interface over `LanguageModel`.

    Greedy generation only (the paper's free-form tasks are greedy): a request asking for
    sampling is refused rather than answered greedily under a sampling task's name.
    """

    def __init__(
        self,
        pretrained: str | Path | None = None,
        tokenizer: str | Path | None = None,
        target: EvalTarget | None = None,
        batch_size: int | str = 8,
        device: str | None = None,
        dtype: str = "fp32",
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        max_batch_size: int | None = None,
    ):
        """`max_batch_size` is accepted because the harness passes it to every model; it
        bounds automatic batch sizes, which this model does not have."""
        super().__init__()
        if (pretrained is None) == (target is None):
            raise ValueError("give exactly one of pretrained=<model folder> and target")
        if isinstance(batch_size, str):
            if not batch_size.isdigit():
                raise ValueError(f"batch_size must be a number, got {batch_size!r}")
            batch_size = int(batch_size)
        target = target or folder_target(pretrained, tokenizer)
        from llamaray.model.device import pick_device

        device = pick_device(device)
        model, tok = target.load(device)
        self.lm = LanguageModel(model, tok, batch_size=batch_size, device=device, dtype=dtype)
        self.target = target
        self.max_gen_toks = int(max_gen_toks)

    @property
    def tokenizer_name(self) -> str:
        """The harness's request cache keys on it."""
        return str(self.lm.tokenizer.path)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = self.lm.loglikelihood([r.args for r in requests])
        return [(r.logprob, r.is_greedy) for r in results]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self.lm.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            _, gen_kwargs = request.args
            groups.setdefault(self._generation_options(gen_kwargs), []).append(i)
        for (until, max_gen_toks), members in groups.items():
            texts = self.lm.generate_until(
                [requests[i].args[0] for i in members], max_new_tokens=max_gen_toks, stop=until
            )
            for i, text in zip(members, texts, strict=True):
                # The harness's models decode the new tokens on their own, and SentencePiece
                # drops the one space that starts them ("▁Paris" -> "Paris"); its tasks'
                # targets and filters expect that.
                out[i] = text[1:] if text.startswith(" ") else text
        return out  # type: ignore[return-value]

    def _generation_options(self, gen_kwargs: dict) -> tuple[tuple[str, ...], int]:
        kwargs = dict(gen_kwargs or {})
        if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
            raise ValueError(
                f"the llamaray harness model generates greedily only; got {gen_kwargs}"
            )
        until = kwargs.pop("until", None) or []
        until = (until,) if isinstance(until, str) else tuple(until)
        max_gen_toks = self.max_gen_toks
        for key in ("max_gen_toks", "max_new_tokens", "max_tokens"):
            if key in kwargs:
                max_gen_toks = int(kwargs.pop(key))
                break
        if max_gen_toks >= self.lm.max_length:
            raise ValueError(
                f"max_gen_toks={max_gen_toks} leaves no room for a prompt in the model's "
                f"max_length={self.lm.max_length}"
            )
        # The harness also stops at the eos string; generation here stops at the eos id.
        return until, max_gen_toks


def task_manager(
    tasks: Sequence[str], include_path: Sequence[str | Path] = (), include_defaults: bool = True
):
    """The harness's task index (its own tasks unless `include_defaults` is false, and those
    under `include_path`), after checking that every name in `tasks` is a task, group or tag
    there, or a task YAML. Indexing the harness's own ~15,000 tasks takes about 9 s, so when
    the `include_path` folders hold every task asked for, only they are indexed."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_path]
    if paths and include_defaults:
        own = TaskManager(include_path=paths, include_defaults=False)
        if not _missing(own, tasks):
            return own
    manager = TaskManager(include_path=paths or None, include_defaults=include_defaults)
    missing = _missing(manager, tasks)
    if missing:
        raise ValueError(
            f"unknown harness task(s): {', '.join(missing)}; `lm-eval ls tasks` lists the "
            "harness's own, --include-path adds a folder of task YAML"
        )
    return manager


def _missing(manager, tasks: Sequence[str]) -> list[str]:
    known = set(manager.all_tasks)
    return [t for t in tasks if t not in known and not Path(t).is_file()]


def evaluate_with_harness(
    lm: HarnessLM,
    tasks: Sequence[str],
    *,
    manager=None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    seed: int = 0,
    log_samples: bool = True,
) -> dict:
    """`lm_eval.simple_evaluate` on `lm`; the harness's results dict (with per-sample
    records under "samples" when `log_samples`). `manager`: from `task_manager`."""
    import lm_eval

    manager = manager or task_manager(tasks)
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        bootstrap_iters=0,  # bootstrapped stderr is slow on CPU, and not what we report
    )
    logger("harness").info(f"{len(tasks)} task(s) in {time.perf_counter() - start:.1f}s")
    return results


def harness_metrics(results: dict) -> dict[str, dict[str, float]]:
    """Per task, the numeric metrics as plain names: "acc,none" -> "acc", a filtered metric
    "exact_match,strict-match" -> "exact_match/strict-match"; stderr entries are left out."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results.get("results", {}).items():
        metrics = {}
        for key, value in values.items():
            if "," not in key or "_stderr" in key or not isinstance(value, int | float):
                continue
            metric, filt = key.split(",", 1)
            metrics[metric if filt == "none" else f"{metric}/{filt}"] = float(value)
        out[task] = metrics
    return out


def as_eval_result(results: dict, step: int | None):
    """The harness's results as an `EvalResult`, for `runner.log_evaluation`: task
    `harness-<name>`, so MLflow holds `eval/harness-<name>/<metric>` beside our own tasks,
    and per-sample records (document, target, responses, scores) as its predictions."""
    from llamaray.eval.runner import EvalResult
    from llamaray.eval.scoring import TaskResult

    out = EvalResult(step)
    samples = results.get("samples", {})
    for task, metrics in harness_metrics(results).items():
        records = [
            {
                "doc_id": sample.get("doc_id"),
                "target": sample.get("target"),
                "arguments": sample.get("arguments"),
                "responses": sample.get("filtered_resps"),
                **{m: sample[m] for m in metrics if m in sample},
            }
            for sample in samples.get(task, [])
        ]
        name = f"harness-{task}"
        out.tasks[name] = TaskResult(name, metrics, _plain(records))
    return out


def _plain(value):
    """JSON-safe copies (the harness's records hold tuples and numpy scalars)."""
    import json

    return json.loads(
        json.dumps(value, default=lambda x: x.item() if hasattr(x, "item") else str(x))
    )
