"""A trained model as an MLflow model: a pyfunc that generates text with llamaray's `Llama`,
tokenizer and generation (`llamaray.model.generation.generate_text`, KV cache and all).

MLflow loads it from code ("models from code": no pickle, which MLflow 3 refuses by
default): the model's entry script (`ENTRY_SCRIPT`) builds a `LlamaTextGenerator`, whose
`load_context` reads the exported Hugging Face folder (weights, config, `tokenizer.model`)
that the MLflow model carries as its artifact `hf`, and llamaray's own code travels in the
model too (`code_paths`), so a machine with the model's pip requirements loads it without
llamaray installed:

    >>> import mlflow  # doctest: +SKIP
    >>> model = mlflow.pyfunc.load_model("models:/demo/1")  # doctest: +SKIP
    >>> model.predict(["def main("], params={"temperature": 0.0, "max_new_tokens": 16})
    ... # doctest: +SKIP
    ['\\n    parser = argparse.ArgumentParser(']

`predict` takes prompts (a list of strings, or a DataFrame with a `prompt` column, which is
what `mlflow models serve` passes on) and returns each prompt's continuation, as
`llamaray generate` prints it after the prompt. Sampling is set per call with `params`
(`max_new_tokens`, `temperature`, `top_p`, `seed`), defaults as `SamplingConfig`'s;
`temperature: 0` is greedy. `tracking.log_model` logs and registers it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from llamaray.model.generation import SamplingConfig

HF_ARTIFACT = "hf"
"""The name of the exported Hugging Face folder among the MLflow model's artifacts."""
PROMPT_COLUMN = "prompt"

ENTRY_SCRIPT = """\
# The entry of llamaray's MLflow model (MLflow's "models from code"): MLflow runs this file
# to build the model, with llamaray's code (shipped in the model's code/ folder) importable.
import mlflow

from llamaray.pyfunc import LlamaTextGenerator

mlflow.models.set_model(LlamaTextGenerator())
"""

REQUIREMENTS = ("torch", "sentencepiece", "safetensors", "numpy", "pandas")
"""What loading and running the model imports, beside MLflow (which adds itself). Pinned
to the versions that trained the model; listed rather than inferred, since MLflow infers
requirements by loading the model in a subprocess: minutes and the whole model in memory
for a large one."""


class LlamaTextGenerator(mlflow.pyfunc.PythonModel):
    """Prompts in, continuations out, from the exported model in the artifact `hf`."""

    def load_context(self, context) -> None:
        from llamaray.model import Llama
        from llamaray.model.device import pick_device
        from llamaray.tokenizer import Tokenizer

        folder = Path(context.artifacts[HF_ARTIFACT])
        self.model = Llama.from_pretrained(folder, device=pick_device(None, setting="device"))
        self.tokenizer = Tokenizer(folder / "tokenizer.model")

    # Typed as a DataFrame, the form MLflow's schema enforcement gives any input (a list of
    # prompts becomes a one-column frame): the signature, not the hint, says what goes in.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        from llamaray.model.generation import generate_text

        prompts = _prompts(model_input)
        config = sampling_config(params)
        return generate_text(self.model, self.tokenizer, prompts, config)


def sampling_config(params: dict | None) -> SamplingConfig:
    """`SamplingConfig` from a call's `params`; a name it does not know is refused (MLflow
    already refuses names outside the signature; this says which ones are known)."""
    known = {f.name for f in dataclasses.fields(SamplingConfig)} - {"eos_id"}
    given = {k: v for k, v in (params or {}).items() if v is not None}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown params {unknown}; known: {sorted(known)}")
    return SamplingConfig(**given)


def _prompts(model_input) -> list[str]:
    if hasattr(model_input, "columns"):  # a DataFrame, as schema enforcement gives it
        column = PROMPT_COLUMN if PROMPT_COLUMN in model_input.columns else model_input.columns[0]
        return [str(p) for p in model_input[column].tolist()]
    if isinstance(model_input, str):
        return [model_input]
    return [str(p) for p in model_input]


def signature():
    """Prompts (strings) in, continuations (strings) out; sampling as params, with
    `SamplingConfig`'s defaults (temperature 0.6, top-p 0.9: 0 for greedy)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    defaults = SamplingConfig()
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [
                ParamSpec("max_new_tokens", "long", defaults.max_new_tokens),
                ParamSpec("temperature", "double", defaults.temperature),
                ParamSpec("top_p", "double", defaults.top_p),
                ParamSpec("seed", "long", defaults.seed),
            ]
        ),
    )


def requirements() -> list[str]:
    """`REQUIREMENTS` pinned to the installed versions (those missing here left unpinned)."""
    pinned = []
    for name in REQUIREMENTS:
        try:
            version = importlib.metadata.version(name).split("+")[0]  # 2.13.0+cpu -> 2.13.0
            pinned.append(f"{name}=={version}")
        except importlib.metadata.PackageNotFoundError:
            pinned.append(name)
    return pinned


def code_path() -> str:
    """llamaray's package folder, shipped inside the model (`code_paths`)."""
    return str(Path(__file__).resolve().parent)
