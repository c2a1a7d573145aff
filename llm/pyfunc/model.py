"""The MLflow pyfunc model of an llm model directory, logged as "models from code": MLflow stores this file as the
model's code and loads it with `llm` (never a pickle); the weights stay safetensors in the model's artifacts.

This directory has no `__init__.py` on purpose: it is not a module of the package, so importing `llm` never
imports MLflow. `llm.registry.log_model` logs it; `model_config["kind"]` says what the model is:

- classifier: DataFrame column `text` → `label`, `probability` (of that label), one row per text.
- instruct: `instruction` and optional `input` → `response` (Alpaca prompt, greedy by default).
- base: `text` (a prompt; empty starts from <|endoftext|>) → `continuation` (the generated text after the prompt).

`model_config["dtype"]` and `model_config["quantize"]` (optional; override them when loading, e.g.
`mlflow.pyfunc.load_model(uri, model_config={"quantize": "int8"})`) choose the inference weight format
(llm.quantize.for_inference: fp32 by default, bf16, int8). Generation settings come through predict's `params`
(max_new_tokens, temperature, top_k, top_p, seed), declared with their defaults in the signature's params schema.
Artifacts: `model` (the model directory), `base` (a classifier's base model directory) and `tokenizer` (the GPT-2
ranks file, so serving works offline).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel, PythonModelContext

from llm.classifier import classify, load_classifier
from llm.data.instructions import Instruction, respond
from llm.device import resolve_device
from llm.generate import GenerationConfig, generate
from llm.hf import load_any
from llm.quantize import for_inference
from llm.tokenizer import EOT_ID, get_tokenizer

GENERATION_PARAMS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")


class LLMModel(PythonModel):
    """Predicts with the classifier, instruction or base model in the artifacts (on cuda when available)."""

    def load_context(self, context: PythonModelContext) -> None:
        artifacts, device = context.artifacts, resolve_device("auto")
        self.kind: str = context.model_config["kind"]
        self.tokenizer = get_tokenizer(artifacts.get("tokenizer"))
        if self.kind == "classifier":
            model: Any = load_classifier(artifacts["model"], base=artifacts["base"], device=device)
        else:
            model = load_any(artifacts["model"], device=device)
        config = context.model_config
        self.model = for_inference(model, config.get("dtype"), config.get("quantize"))

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if self.kind == "classifier":
            labels = classify(self.model, model_input["text"].astype(str).tolist(), self.tokenizer)
            return pd.DataFrame(labels, columns=["label", "probability"])
        given = {key: value for key, value in (params or {}).items() if key in GENERATION_PARAMS}
        settings = GenerationConfig(**given)
        if self.kind == "instruct":
            inputs = model_input["input"] if "input" in model_input else pd.Series([""] * len(model_input))
            entries = [
                Instruction(str(instruction), "" if pd.isna(text) else str(text), "")
                for instruction, text in zip(model_input["instruction"], inputs, strict=True)
            ]
            return pd.DataFrame({"response": respond(self.model, entries, self.tokenizer, settings, progress=False)})
        prompts = [self.tokenizer.encode(str(text), allowed_special="all") or [EOT_ID] for text in model_input["text"]]
        eos = EOT_ID if self.model.config.vocab_size > EOT_ID else None
        new_tokens = generate(self.model, prompts, settings, eos_id=eos)
        return pd.DataFrame({"continuation": [self.tokenizer.decode(ids) for ids in new_tokens]})


set_model(LLMModel())
