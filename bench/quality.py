"""What the inference weight formats cost in quality, measured on the pipeline's trained models.

For each format (fp32, bf16, int8: `llm.quantize.for_inference` with its defaults; int8 once more with its int8
kernel for every call, see INT8_KERNEL_ONLY) and the models a `make run` left in a pipeline directory (models/base,
models/classifier, models/instruct, with its params.yaml and data/): the base model's held-out perplexity (as the
evaluate stage scores it), the classifier's test accuracy (the test split finetune_classifier scores), the
instruction model's mean ROUGE-L F1 on the test split (responses generated as finetune_instructions does), and
greedy continuations compared with fp32's: the instruction model's test responses and base-model continuations of
`--prompts` held-out snippets (identical ones, and the mean share of tokens before the first difference).

    python bench/quality.py --run /path/to/pipeline/dir          # reads only; run from this repository

The code measured is this checkout's; the directory only supplies models, params and data (it is not written).
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/tokenize.py is named like the standard library's `tokenize`: look in this folder after the stdlib.
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.append(sys.path.pop(0))

import argparse
import os
import statistics
import time
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FORMATS = {"fp32": ("fp32", None), "bf16": ("bf16", None), "int8": (None, "int8")}  # (dtype, quantize)
# int8 once more with the int8 kernel for every call: below GEMM_ROWS rows (decoding) it rounds the inputs too on
# x86 CPUs, while scoring batches and prompts from GEMM_ROWS rows on normally take the weight-only GEMM
INT8_KERNEL_ONLY = "int8, int8 kernel at every size"
FORMATS[INT8_KERNEL_ONLY] = FORMATS["int8"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a pipeline directory after `make run` (read only)")
    parser.add_argument("--prompts", type=int, default=20, help="held-out snippets continued by the base model")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="tokens per snippet (default %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens each continuation adds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return parser.parse_args()


def measure(name: str, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """Every quality figure of format `name` (run inside the pipeline directory)."""
    from llm.classifier import classification_metrics, load_classifier, predict_proba
    from llm.classifier_tuning import ClassifierTuningConfig
    from llm.data.instructions import read_instruction_set, split_entries
    from llm.evaluation import heldout_tokens, perplexity, rouge_l_f1
    from llm.generate import generate
    from llm.instruction_tuning import InstructConfig
    from llm.model_dir import load_model
    from llm.quantize import for_inference
    from stages.common import BASE_MODEL, INSTRUCT_MODEL, params_section, tokenizer
    from stages.evaluate import HELDOUT, EvaluateParams

    start = time.perf_counter()
    dtype, quantize = FORMATS[name]
    if name == INT8_KERNEL_ONLY:
        import llm.quantize

        llm.quantize.GEMM_ROWS = dict.fromkeys(llm.quantize.GEMM_ROWS, sys.maxsize)  # for the rest of the run
    encoding, evaluate = tokenizer(), params_section("evaluate", EvaluateParams)
    base = for_inference(load_model(BASE_MODEL), dtype, quantize)
    held = perplexity(base, heldout_tokens(HELDOUT, encoding, evaluate.heldout_max_tokens), progress=False,
                      batch_size=evaluate.batch_size)  # fmt: skip
    continuations = generate(base, prompts, max_new_tokens=new_tokens, temperature=0.0)
    tuning = params_section("finetune_classifier", ClassifierTuningConfig)
    data, classifier_config, _ = tuning.datasets(encoding)
    classifier = for_inference(load_classifier(Path("models/classifier")), dtype, quantize)
    test = classification_metrics(*predict_proba(classifier, data["test"].batches(tuning.eval_batch_size)),
                                  classifier_config.labels)  # fmt: skip
    instruct_params = params_section("finetune_instructions", InstructConfig)
    entries = split_entries(read_instruction_set(instruct_params.data).entries, instruct_params.split_seed)["test"]
    instruct = for_inference(load_model(INSTRUCT_MODEL), dtype, quantize)
    responses = instruct_params.responses(instruct, entries, encoding)
    rouge = statistics.fmean(rouge_l_f1(r, e.output) for r, e in zip(responses, entries, strict=True))
    return {
        "perplexity": held.perplexity,
        "accuracy": test["accuracy"],
        "rouge_l": rouge,
        "responses": responses,
        "continuations": continuations,
        "seconds": time.perf_counter() - start,
    }


def agreement(rows: list[list[Any]], reference: list[list[Any]]) -> tuple[int, float]:
    """(rows identical to the reference's, mean share of each reference row before the first difference)."""
    same, shares = 0, []
    for row, ref in zip(rows, reference, strict=True):
        same += row == ref
        prefix = next((i for i, (a, b) in enumerate(zip(row, ref, strict=False)) if a != b), min(len(row), len(ref)))
        shares.append(prefix / len(ref) if ref else 1.0)
    return same, statistics.fmean(shares)


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(REPO))  # stages/ and llm/ of this checkout, whatever the working directory
    os.chdir(args.run)
    import torch

    from llm.evaluation import heldout_tokens
    from stages.common import tokenizer
    from stages.evaluate import HELDOUT

    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = heldout_tokens(HELDOUT, tokenizer()).tolist()
    step = len(tokens) // args.prompts
    prompts = [tokens[i * step : i * step + args.prompt_tokens] for i in range(args.prompts)]
    results = {}
    for name in FORMATS:
        results[name] = measure(name, prompts, args.new_tokens)
        print(f"  {name} measured in {results[name]['seconds']:.0f} s", file=sys.stderr, flush=True)
    fp32 = results["fp32"]
    print(f"# Quality of the inference weight formats: models of {Path(args.run).resolve()}, torch threads "
          f"{torch.get_num_threads()}\n")  # fmt: skip
    header = [
        "format",
        "held-out ppl",
        "vs fp32",
        "classifier test acc",
        "vs fp32 (points)",
        "instruct ROUGE-L",
        "vs fp32",
        "instruct responses = fp32",
        "base continuations = fp32",
        "tokens before 1st difference",
    ]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, r in results.items():
        same_responses, _ = agreement(r["responses"], fp32["responses"])
        same_continuations, share = agreement(r["continuations"], fp32["continuations"])
        cells = [
            name, f"{r['perplexity']:.3f}", f"{r['perplexity'] / fp32['perplexity'] - 1:+.2%}",
            f"{r['accuracy']:.4f}", f"{100 * (r['accuracy'] - fp32['accuracy']):+.2f}", f"{r['rouge_l']:.4f}",
            f"{r['rouge_l'] / fp32['rouge_l'] - 1:+.2%}", f"{same_responses}/{len(r['responses'])}",
            f"{same_continuations}/{len(prompts)}", f"{share:.0%}",
        ]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    encoding = tokenizer()
    print(f"\nFirst held-out snippet: {encoding.decode(prompts[0])!r}")
    for name, r in results.items():
        print(f"- {name}: {encoding.decode(r['continuations'][0])!r}")


if __name__ == "__main__":
    main()
