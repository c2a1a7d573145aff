"""Inference weight formats (llm.quantize): bf16 and int8 against fp32, and the --dtype / --quantize options of the
CLI, the server's loader and the MLflow pyfunc."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llm import cli, quantize
from llm.config import GPTConfig, get_preset
from llm.errors import LLMError
from llm.generate import generate
from llm.model import GPT
from llm.model_dir import save_model
from llm.quantize import FBGEMM, GEMM_ROWS, ONEDNN_BF16, Int8Linear, PackedLinear, for_inference, resolve_format

needs_fbgemm = pytest.mark.skipif(not FBGEMM, reason="fbgemm multiplies int8 only in x86 builds of torch")
needs_onednn_bf16 = pytest.mark.skipif(not ONEDNN_BF16, reason="oneDNN's bf16 kernels need AVX-512 or newer")

# (dtype, quantize, int8 kernel): bf16 (oneDNN's packed weights on CPU); int8 through fbgemm (x86 CPUs: fp32
# activations by default, bf16 on request) and through aten._weight_int8pack_mm (other devices: bf16 activations)
FORMATS = [
    pytest.param("bf16", None, None, id="bf16"),
    pytest.param(None, "int8", "fbgemm", id="int8-fbgemm", marks=needs_fbgemm),
    pytest.param("bf16", "int8", "fbgemm", id="int8-fbgemm-bf16", marks=needs_fbgemm),
    pytest.param(None, "int8", "int8pack", id="int8-int8pack"),
]
# Relative error ||logits - fp32 logits|| / ||fp32 logits|| allowed for a random small model: bf16 keeps 8 bits
# of mantissa (relative rounding 2^-9 per weight and activation), int8 per-row weights 1/254 of the row's largest
# weight, and fbgemm rounds the inputs of every linear layer to 7 bits too; errors of independent roundings partly
# cancel in every dot product.
TOLERANCE = {"bf16": 2e-2, "int8": 4e-2}


def convert(model: nn.Module, dtype: str | None, quantize_: str | None, kernel: str | None,
            monkeypatch: pytest.MonkeyPatch) -> nn.Module:  # fmt: skip
    """A converted copy of `model`; int8 `kernel` "int8pack" is the one devices without fbgemm use."""
    if kernel == "int8pack":
        monkeypatch.setattr(quantize, "FBGEMM", False)
    return for_inference(copy.deepcopy(model), dtype, quantize_)


@pytest.fixture(scope="module")
def random_model() -> GPT:
    torch.manual_seed(0)
    return GPT(get_preset("cpu-tiny", vocab_size=256, context_length=32)).eval()


@pytest.fixture(scope="module")
def cycle_model() -> tuple[GPT, torch.Tensor]:
    """A tiny model trained until it continues the cycle 0, 5, 10, ... (mod 32) with wide logit margins, so every
    format's greedy tokens must equal fp32's; and that sequence."""
    torch.manual_seed(0)
    vocab = 32
    model = GPT(GPTConfig(vocab_size=vocab, context_length=24, emb_dim=32, n_heads=2, n_layers=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sequence = torch.arange(100) * 5 % vocab
    for _ in range(60):
        batch = torch.stack([sequence[s : s + 17] for s in torch.randint(0, 100 - 17, (8,)).tolist()])
        loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), sequence


@pytest.mark.parametrize(("dtype", "quantize_", "kernel"), FORMATS)
@pytest.mark.parametrize("rows", [1, 32])  # a decoding step, and a batch of prompts
def test_logits_are_close_to_fp32(random_model: GPT, dtype: str | None, quantize_: str | None, kernel: str | None,
                                  rows: int, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    ids = ids if rows > 1 else ids[:1, :1]
    with torch.no_grad():
        reference = random_model(ids)
        logits = convert(random_model, dtype, quantize_, kernel, monkeypatch)(ids)
    activations = "fp32" if (dtype, kernel) == (None, "fbgemm") else "bf16"  # int8's default: fp32 for fbgemm
    assert logits.dtype == quantize.DTYPES[activations]
    error = (logits.float() - reference).norm() / reference.norm()
    assert error < TOLERANCE[quantize_ or dtype], float(error)


@pytest.mark.parametrize(("dtype", "quantize_", "kernel"), FORMATS)
@pytest.mark.parametrize("rows", [1, 2])  # one row, and a batch
def test_greedy_tokens_equal_fp32(cycle_model: tuple[GPT, torch.Tensor], dtype: str | None, quantize_: str | None,
                                  kernel: str | None, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    model, sequence = cycle_model
    prompts = [sequence[:5].tolist(), sequence[10:13].tolist()][:rows]
    expected = [sequence[5:21].tolist(), sequence[13:29].tolist()][:rows]
    assert generate(model, prompts, max_new_tokens=16, temperature=0.0) == expected  # the model learned the cycle
    converted = convert(model, dtype, quantize_, kernel, monkeypatch)
    assert generate(converted, prompts, max_new_tokens=16, temperature=0.0) == expected
    assert generate(converted, prompts, max_new_tokens=16, temperature=0.0, use_cache=False) == expected


@pytest.mark.parametrize(
    ("kernel", "rows", "tolerance"),
    [
        pytest.param("fbgemm", 15, 2e-2, marks=needs_fbgemm),  # int8 weights and 7-bit inputs
        pytest.param("fbgemm", GEMM_ROWS["fbgemm"], 1e-5, marks=needs_fbgemm),  # one GEMM: weight-only
        ("int8pack", 15, 1e-5),  # weight-only
        ("int8pack", GEMM_ROWS["int8pack"], 1e-5),  # one GEMM
    ],
)
def test_int8_linear_quantizes_each_row_to_its_own_scale(kernel: str, rows: int, tolerance: float,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    if kernel == "int8pack":
        monkeypatch.setattr(quantize, "FBGEMM", False)
    torch.manual_seed(0)
    dense = nn.Linear(64, 8)
    with torch.no_grad():
        dense.weight[3] *= 100  # one row far larger than the rest: per-row scales keep the others precise
    quantized = Int8Linear(dense, torch.float32)
    assert (quantized.packed is not None) == (kernel == "fbgemm")
    assert quantized.weight.dtype == torch.int8 and int(quantized.weight.abs().max()) == 127
    dequantized = quantized.weight.float() * quantized.scale[:, None]
    assert ((dequantized - dense.weight).abs() <= quantized.scale[:, None] / 2 + 1e-7).all()  # round to nearest
    x = torch.randn(1, rows, 64)
    with torch.no_grad():
        y, expected = quantized(x), F.linear(x, dequantized, dense.bias)
    assert y.shape == expected.shape
    assert (y - expected).norm() / expected.norm() < tolerance


@needs_fbgemm
def test_fbgemm_rounds_each_input_row_to_its_own_scale() -> None:
    """fbgemm takes one input scale per call: a row batched with a row 1000 times larger must come out as alone."""
    torch.manual_seed(0)
    quantized = Int8Linear(nn.Linear(64, 32), torch.float32)
    row = torch.randn(1, 64)
    with torch.no_grad():
        alone = quantized(row)
        batched = quantized(torch.cat([row, 1000 * torch.randn(1, 64)]))[:1]
        exact = F.linear(row, quantized.weight.float() * quantized.scale[:, None], quantized.bias)
    assert (alone - exact).norm() / exact.norm() < 2e-2  # 7-bit inputs, as in the test above
    assert (batched - exact).norm() / exact.norm() < 2e-2


@needs_onednn_bf16
def test_bf16_packed_linear_matches_f_linear() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(64, 96).bfloat16()
    packed = PackedLinear(dense)
    assert not list(packed.buffers()) and packed.packed.is_mkldnn  # the packed weight stays out of the state dict
    with torch.no_grad():
        for x in (torch.randn(1, 1, 64), torch.randn(3, 5, 64)):  # a decoding step, and a batch of prompts
            x = x.bfloat16()
            torch.testing.assert_close(packed(x), dense(x), rtol=1e-2, atol=1e-2)
        dense.bias = None
        torch.testing.assert_close(PackedLinear(dense)(x), F.linear(x, dense.weight), rtol=1e-2, atol=1e-2)


def test_fp32_default_leaves_the_model_as_it_is(random_model: GPT) -> None:
    model = copy.deepcopy(random_model)
    assert for_inference(model) is model
    after, before = model.state_dict(), random_model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())


def test_int8_replaces_every_linear_layer_and_keeps_the_embedding(random_model: GPT,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    model = for_inference(copy.deepcopy(random_model), quantize="int8")
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 4 * 2 + 1  # 4 per block and the head
    assert for_inference(copy.deepcopy(random_model), "fp32", "int8").tok_emb.weight.dtype == torch.float32
    assert for_inference(copy.deepcopy(random_model), "bf16", "int8").tok_emb.weight.dtype == torch.bfloat16
    # activations (and the KV cache) by default: fp32 where fbgemm multiplies, bf16 for aten._weight_int8pack_mm
    assert model.tok_emb.weight.dtype == (torch.float32 if FBGEMM else torch.bfloat16)
    assert resolve_format(None, "int8", "cpu") == ("fp32" if FBGEMM else "bf16", "int8")
    assert resolve_format(None, "int8", "cuda") == resolve_format(None, "int8", "mps") == ("bf16", "int8")
    monkeypatch.setattr(quantize, "FBGEMM", False)
    assert for_inference(copy.deepcopy(random_model), quantize="int8").tok_emb.weight.dtype == torch.bfloat16


@needs_onednn_bf16
def test_bf16_on_cpu_packs_every_linear_layer(random_model: GPT) -> None:
    model = for_inference(copy.deepcopy(random_model), "bf16")
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 4 * 2 + 1
    assert model.tok_emb.weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("dtype", "quantize", "message"),
    [("fp16", None, "unknown inference dtype 'fp16': choose fp32, bf16"), (None, "int4", "choose int8")],
)
def test_bad_formats_are_refused(dtype: str | None, quantize: str | None, message: str) -> None:
    with pytest.raises(LLMError, match=message):
        resolve_format(dtype, quantize, "cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("quantize") / "tiny"
    save_model(GPT(GPTConfig(context_length=24, emb_dim=16, n_heads=2, n_layers=1)), path)
    return path


@pytest.mark.parametrize("options", [["--dtype", "bf16"], ["--quantize", "int8"], ["--dtype", "fp32"]])
def test_cli_generate_accepts_the_formats(model_dir: Path, options: list[str], capsys: pytest.CaptureFixture) -> None:
    args = ["generate", "--model", str(model_dir), "--prompt", "Hi", "--max-new-tokens", "3", "--temperature", "0"]
    assert cli.main([*args, *options]) == 0
    assert capsys.readouterr().out.startswith("Hi")


@pytest.mark.parametrize("command", ["generate", "instruct", "classify", "serve"])
def test_cli_refuses_a_bad_format_in_one_line(command: str, capsys: pytest.CaptureFixture) -> None:
    args = {"generate": ["--model", "x", "--prompt", "p"], "instruct": ["do"], "classify": ["a text"]}
    args["serve"] = ["--model", "x"]
    assert cli.main([command, *args[command], "--quantize", "int4"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown quantization 'int4': choose int8 (or none)"]


def test_served_and_pyfunc_models_take_the_format(model_dir: Path) -> None:
    pytest.importorskip("mlflow")
    import importlib.util

    from mlflow.pyfunc import PythonModelContext

    from llm.serve.loading import load_served

    served = load_served(str(model_dir), dtype="bf16")
    assert served.model.tok_emb.weight.dtype == torch.bfloat16
    spec = importlib.util.spec_from_file_location("llm_pyfunc_model", Path(cli.__file__).parent / "pyfunc" / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pyfunc = module.LLMModel()
    pyfunc.load_context(PythonModelContext({"model": str(model_dir)}, {"kind": "base", "quantize": "int8"}))
    assert isinstance(pyfunc.model.lm_head, Int8Linear)
    import pandas as pd

    out = pyfunc.predict(None, pd.DataFrame({"text": ["Hello"]}), {"max_new_tokens": 2, "temperature": 0.0})
    assert list(out.columns) == ["continuation"]
