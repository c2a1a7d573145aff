"""Every speed optimization computes what the plain path computes (speed itself is measured in bench/)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llm.kernels
from llm.config import get_preset
from llm.losses import _balanced_rows, linear_cross_entropy
from llm.model import GPT

VOCAB = 101  # not a multiple of 64: the fused loss pads it to 128 for its matmuls


def _head_inputs(n: int = 37, dim: int = 16, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    h = torch.randn(n, dim, dtype=dtype, requires_grad=True)
    w = (torch.randn(VOCAB, dim, dtype=dtype) * 0.5).requires_grad_()
    y = torch.randint(0, VOCAB, (n,))
    y[::4] = -100
    return h, w, y


def _loss_and_grads(loss_fn, h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    h.grad = w.grad = None
    loss = loss_fn()
    (3 * loss).backward()  # a non-unit upstream gradient must scale the stored gradients
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_rows", [None, 1, 8, 36])
def test_fused_loss_equals_plain_cross_entropy_and_gradients(chunk_rows: int | None) -> None:
    h, w, y = _head_inputs(dtype=torch.float64)
    plain = _loss_and_grads(lambda: F.cross_entropy(h @ w.T, y, ignore_index=-100), h, w)
    fused = _loss_and_grads(lambda: linear_cross_entropy(h, w, y, chunk_rows=chunk_rows), h, w)
    for got, expected in zip(fused, plain, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert fused[2].shape == (VOCAB, 16)  # the padding never reaches the weight's gradient


def test_fused_loss_under_bf16_autocast_matches_plain_autocast_path() -> None:
    h, w, y = _head_inputs(n=64, dim=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _loss_and_grads(lambda: F.cross_entropy((h @ w.T).float(), y), h, w)
        fused = _loss_and_grads(lambda: linear_cross_entropy(h, w, y, chunk_rows=16), h, w)
    assert fused[0].dtype == torch.float32 and fused[1].dtype == h.dtype and fused[2].dtype == w.dtype
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-4, atol=1e-4)  # same bf16 logits, fp32 softmax
    for got, expected in zip(fused[1:], plain[1:], strict=True):  # bf16 matmuls: ~3 significant digits
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-3 * expected.abs().max().item())
    fp32 = _loss_and_grads(lambda: linear_cross_entropy(h, w, y), h, w)
    torch.testing.assert_close(fused[0], fp32[0], rtol=2e-2, atol=0)


def test_fused_loss_without_gradients_and_extreme_logits() -> None:
    h, w, y = _head_inputs()
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, y, chunk_rows=5), F.cross_entropy(h @ w.T, y))
    big = torch.zeros(2, 2)
    big[:, 0] = 30.0  # logits 0 vs 30 * 2: the target's probability is exp(-60), still exact
    loss = linear_cross_entropy(big, torch.eye(2) * 2, torch.tensor([1, 1]))
    torch.testing.assert_close(loss, F.cross_entropy(big @ (torch.eye(2) * 2), torch.tensor([1, 1])))
    assert torch.isnan(linear_cross_entropy(h, w, torch.full_like(y, -100)))  # like F.cross_entropy: 0 / 0


def test_fused_loss_of_no_rows_gives_zero_gradients() -> None:
    h, w, y = _head_inputs(n=0)
    linear_cross_entropy(h, w, y).backward()
    assert h.grad.shape == (0, 16) and torch.equal(w.grad, torch.zeros_like(w))


def test_fused_loss_refuses_a_second_backward_instead_of_reusing_scaled_gradients() -> None:
    h, w, y = _head_inputs()
    loss = linear_cross_entropy(h, w, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_chunks_are_as_few_as_allowed_and_balanced() -> None:
    assert _balanced_rows(1024, 667) == 512  # GPT-2 124M at 2 x 512 tokens: two equal chunks, not 667 + 357
    assert _balanced_rows(0, 667) == 1  # no rows: still a valid chunk size
    for n in range(1, 200):
        for max_rows in (1, 3, 64, 199, 500):
            rows = _balanced_rows(n, max_rows)
            chunks = -(-n // rows)
            assert rows <= max_rows and chunks == -(-n // max_rows)
            assert chunks * rows - n < chunks  # the last chunk is at most one row per chunk short


@pytest.mark.parametrize("autocast", [False, True])
def test_tied_weight_gradients_are_summed_in_place(autocast: bool) -> None:
    """The head's weight gradient comes out of the fused loss as a fresh tensor, so autograd adds the token
    embedding's gradient into it instead of allocating a third (vocab, emb_dim) tensor for the sum."""
    torch.manual_seed(0)
    model = GPT(get_preset("cpu-tiny", vocab_size=VOCAB, context_length=32))
    assert model.lm_head.weight is model.tok_emb.weight
    x = torch.randint(0, VOCAB, (2, 24))
    with torch.profiler.profile(record_shapes=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(x, x)
        loss.backward()
    weight_shape = list(model.tok_emb.weight.shape)
    sums = {e.name for e in prof.events() if e.name in ("aten::add", "aten::add_") and weight_shape in e.input_shapes}
    assert sums == {"aten::add_"}


@pytest.fixture(scope="module")
def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(get_preset("cpu-tiny", vocab_size=VOCAB, context_length=32))


def _model_loss_and_grads(model: GPT, fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    x, y = torch.randint(0, VOCAB, (2, 24)), torch.randint(0, VOCAB, (2, 24))
    y[0, :5] = -100
    model.zero_grad(set_to_none=True)
    loss = model(x, y) if fused else F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_model_training_loss_uses_the_fused_head_with_plain_results(tiny: GPT) -> None:
    loss, grads = _model_loss_and_grads(tiny, fused=True)
    plain_loss, plain_grads = _model_loss_and_grads(tiny, fused=False)
    torch.testing.assert_close(loss, plain_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert tiny(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, VOCAB)  # logits: the real vocabulary only


def test_swapped_head_falls_back_to_the_plain_loss() -> None:
    torch.manual_seed(0)
    model = GPT(get_preset("cpu-tiny", vocab_size=VOCAB, context_length=32))
    model.lm_head = nn.Linear(64, 5)  # e.g. a classifier head with a bias
    x, y = torch.randint(0, VOCAB, (2, 8)), torch.randint(0, 5, (2, 8))
    torch.testing.assert_close(model(x, y), F.cross_entropy(model(x).flatten(0, 1), y.flatten()))


def test_bf16_autocast_training_loss_is_close_to_fp32(tiny: GPT) -> None:
    x = torch.randint(0, VOCAB, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_bf16 = tiny(x, x)
    torch.testing.assert_close(loss_bf16, tiny(x, x), rtol=1e-2, atol=0)


@pytest.fixture
def no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every tensor -> Python conversion (a device sync on GPUs) raise."""

    def sync(*_: object) -> None:
        raise AssertionError("host sync")

    for method in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, method, sync)


def test_training_step_and_cached_decoding_never_sync_with_the_host(tiny: GPT, no_host_sync: None) -> None:
    x = torch.randint(0, VOCAB, (2, 16))
    tiny(x, x).backward()
    cache = tiny.new_cache(2)
    tiny(x, cache=cache)
    for _ in range(3):
        tiny(x[:, :1], cache=cache)
    with pytest.raises(AssertionError, match="host sync"):
        bool(x.sum())  # the guard works


def test_compiled_model_matches_eager_loss_and_gradients(tiny: GPT) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(tiny, backend="aot_eager", fullgraph=True)  # one graph: no breaks in forward
    loss, grads = _model_loss_and_grads(compiled, fused=True)  # type: ignore[arg-type]
    eager_loss, eager_grads = _model_loss_and_grads(tiny, fused=True)
    torch.testing.assert_close(loss, eager_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name.removeprefix("_orig_mod.")], msg=name)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 64), (2, 1, 64), (2, 5, 64)])
def test_linear_runs_fp32_inference_through_onednn_with_the_same_result(
    shape: tuple[int, ...], bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp32 inference on CPU takes oneDNN's op (counted) and agrees with F.linear, also for a non-contiguous
    input (the last position of a sequence); with gradients, under autocast or in another dtype it is F.linear."""
    if not llm.kernels.ONEDNN_LINEAR:
        pytest.skip("this torch build has no oneDNN linear op")
    torch.manual_seed(0)
    layer = llm.kernels.Linear(64, 48, bias=bias)
    calls: list[int] = []
    onednn = torch.ops.mkldnn._linear_pointwise

    class Ops:  # torch.ops.mkldnn, with the op counted
        @staticmethod
        def _linear_pointwise(*args: object) -> torch.Tensor:
            calls.append(1)
            return onednn(*args)

    monkeypatch.setattr(torch.ops, "mkldnn", Ops)
    x = torch.randn(*shape[:-1], 3, shape[-1])[..., -1, :] if len(shape) == 3 else torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        assert len(calls) == 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16
        assert layer.to(torch.float64)(x.double()).dtype == torch.float64
        layer.float()
    out = layer(x)
    assert out.requires_grad and len(calls) == 1  # training never takes the inference op
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("shape", [(3, 64), (1, 64), (1, 1, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_compiled_inference_with_inductor_matches_eager(shape: tuple[int, ...], bias: bool) -> None:
    """Inductor cannot lower the oneDNN inference op: a compiled fp32 inference runs a GEMM for several rows and,
    for one row (decoding), inductor's own fused dot-product kernel; both give the eager (oneDNN) result."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = llm.kernels.Linear(64, 48, bias=bias)
    x = torch.randn(shape)
    with torch.no_grad():
        out, (code,) = run_and_get_code(torch.compile(layer), x)
        torch.testing.assert_close(out, layer(x))
    assert out.shape == (*shape[:-1], 48)
    assert ("extern_kernels." in code) == (x.numel() > 64), code  # a library GEMM call only for several rows


def test_bf16_attention_by_matmuls_matches_the_fused_kernel(tiny: GPT, monkeypatch: pytest.MonkeyPatch) -> None:
    def bf16_loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _model_loss_and_grads(tiny, fused=True)

    calls: list[int] = []
    original = llm.kernels._causal_attention_by_matmuls
    monkeypatch.setattr(llm.kernels, "_causal_attention_by_matmuls", lambda *a: calls.append(1) or original(*a))
    loss, grads = bf16_loss_and_grads()
    assert len(calls) == tiny.config.n_layers
    monkeypatch.setattr(llm.kernels, "MATMUL_ATTENTION_SCORES", 0)  # too many scores: the SDPA kernel
    sdpa_loss, sdpa_grads = bf16_loss_and_grads()
    assert len(calls) == tiny.config.n_layers
    torch.testing.assert_close(loss, sdpa_loss, rtol=5e-3, atol=0)
    for name, grad in grads.items():
        scale = sdpa_grads[name].abs().max().item()
        torch.testing.assert_close(grad, sdpa_grads[name], rtol=0, atol=0.05 * scale, msg=name)
