"""The column product the engine's linear layers take on a CPU: same values as ``F.linear``, and the
model's layers are back to their own forward afterwards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from directer.linears import MAX_COLUMN_TOKENS, column_linears, column_product, row_blocks


@pytest.mark.parametrize("tokens", [1, 2, 3, 8, 9, 15, 16, 17, MAX_COLUMN_TOKENS, MAX_COLUMN_TOKENS + 1])
@pytest.mark.parametrize("bias", [False, True])
def test_column_product_equals_linear(tokens, bias):
    torch.manual_seed(tokens)
    linear = torch.nn.Linear(96, 40, bias=bias)
    x = torch.randn(1, tokens, 96)
    out = column_product(linear, x)
    assert out.shape == (1, tokens, 40)
    assert out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)


def test_one_token_splits_rows_into_equal_blocks_one_per_thread():
    assert row_blocks(576, 2) == 2
    assert row_blocks(49152, 6) == 6
    assert row_blocks(40, 3) == 2  # 3 does not divide 40
    assert row_blocks(7, 4) == 1  # a prime: one block, F.linear


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_one_token_in_row_blocks_equals_linear(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        linear = torch.nn.Linear(96, 48, bias=True)
        x = torch.randn(1, 1, 96)
        assert row_blocks(48, threads) == threads  # the batched path, whatever this machine's threads
        torch.testing.assert_close(column_product(linear, x), F.linear(x, linear.weight, linear.bias))
    finally:
        torch.set_num_threads(previous)


def test_column_linears_routes_every_linear_and_restores_them():
    model = tiny_model("llama")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ids = torch.tensor([[5, 9, 17, 3]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        with column_linears(model):
            assert all(linear.forward.func is column_product for linear in linears)
            during = model(input_ids=ids).logits
        assert all("forward" not in vars(linear) for linear in linears)
        after = model(input_ids=ids).logits
    torch.testing.assert_close(during, before, rtol=1e-4, atol=1e-4)
    assert torch.equal(after, before)
