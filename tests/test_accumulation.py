"""Gradient accumulation (--micro-batch-size): an optimiser step over a mini-batch equals the same step accumulated
over its micro-batches, each loss weighted by its share of the mini-batch, on the engines the scripts train with."""

import copy

import pytest
import torch

import common

EPS = 0.1  # AdamW's ε as large as the gradients: the step depends on the gradient's scale, not only its direction


class _Tiny(torch.nn.Sequential):
    device = torch.device("cpu")  # engines read their model's device, as of a transformers model


def _model():
    torch.manual_seed(0)
    return _Tiny(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _data():
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(8, 6, generator=generator)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0]])
    return inputs, mask.float()


def _token_mean_loss(model, inputs, mask):
    out = model(inputs)
    return ((out - 0.5) ** 2 * mask).sum() / mask.sum()


def _train(engine, micro_batch_size, steps=2):
    """Two optimiser steps on the 8 ragged rows: each mini-batch split into micro-batches of `micro_batch_size`."""
    inputs, mask = _data()
    idx = torch.arange(8)
    for _ in range(steps):
        for micro in common.micro_batches(idx, micro_batch_size):
            share = common.token_share(mask[micro], mask[idx])
            loss = _token_mean_loss(engine.module, inputs[micro], mask[micro]) * share
            engine.backward(loss, scale_wrt_gas=False)
            engine.step()
    return [p.detach().clone() for p in engine.module.parameters()]


def test_token_share_sums_to_one_and_weights_a_token_mean_into_the_mini_batch_mean():
    inputs, mask = _data()
    model = _model()
    idx = torch.arange(8)
    parts = [_token_mean_loss(model, inputs[m], mask[m]) * common.token_share(mask[m], mask) for m in idx.split(3)]
    assert sum(common.token_share(mask[m], mask) for m in idx.split(3)) == pytest.approx(1.0)
    assert torch.allclose(sum(parts), _token_mean_loss(model, inputs, mask), atol=1e-6)
    assert [len(m) for m in common.micro_batches(idx, 0)] == [8]
    assert [len(m) for m in common.micro_batches(idx, 2)] == [2, 2, 2, 2]


def test_torch_engine_steps_once_per_mini_batch_and_equals_the_whole_mini_batch():
    base = _model()
    whole = _train(common.TorchEngine(copy.deepcopy(base), lr=1e-2, eps=EPS), micro_batch_size=8)
    accumulated = _train(
        common.TorchEngine(copy.deepcopy(base), lr=1e-2, eps=EPS, accumulation_steps=4), micro_batch_size=2
    )
    one_pass_per_step = _train(common.TorchEngine(copy.deepcopy(base), lr=1e-2, eps=EPS), micro_batch_size=2)
    for a, b in zip(whole, accumulated):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert any((a - c).abs().max() > 1e-4 for a, c in zip(whole, one_pass_per_step))  # 4 steps a mini-batch differ


@pytest.fixture(scope="module")
def one_process_group():
    """A process group of one in this process, as `python script.py` makes; afterwards the environment it set (RANK,
    MASTER_PORT, ...) is restored: the script runs that later tests start would inherit it, and take this process's
    port for their own group."""
    import os

    before = dict(os.environ)
    common.init_distributed(0)
    yield
    for key in set(os.environ) - set(before):
        del os.environ[key]
    os.environ.update(before)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_deepspeed_engine_accumulates_as_configured(zero_stage, one_process_group):
    base = _model()

    def engine(micro, accumulation):
        return common.prepare_trainable(
            copy.deepcopy(base),
            placement="policy",
            zero_stage=zero_stage,
            micro_batch_size=micro,
            lr=1e-2,
            eps=EPS,
            accumulation_steps=accumulation,
        )

    whole = _train(engine(8, 1), micro_batch_size=8)
    accumulated = _train(engine(2, 4), micro_batch_size=2)
    for a, b in zip(whole, accumulated):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
