import pytest
import numpy as np
import torch

from clara.model.topk import differentiable_topk, flat_cosine


def test_forward_is_exactly_hard_topk_in_order():
    torch.manual_seed(0)
    scores = torch.randn(4, 20)
    items = torch.randn(4, 20, 3, 8)
    w, idx = differentiable_topk(scores, 5, tau=0.02)
    expected = scores.topk(5, dim=-1).indices
    assert torch.equal(idx, expected)
    # Each slot is exactly one-hot in value, so W @ M is exactly the gathered items.
    assert torch.equal(w, torch.nn.functional.one_hot(expected, 20).float())
    selected = torch.einsum("bkn,bnmh->bkmh", w, items)
    gathered = items[torch.arange(4)[:, None], expected]
    assert torch.equal(selected, gathered)


def test_no_document_picked_twice_even_with_ties():
    scores = torch.zeros(3, 10)
    scores[:, :4] = 1.0  # four-way tie at the top
    w, idx = differentiable_topk(scores, 6)
    for row in idx.tolist():
        assert len(set(row)) == 6
    assert torch.equal(w.sum(1), (w.sum(1) > 0).float())  # every candidate weighted at most once


def test_gradients_reach_scores_and_query_parameters():
    torch.manual_seed(0)
    proj = torch.nn.Linear(8, 8)  # stands in for the query reasoner
    query = proj(torch.randn(2, 8))
    docs = torch.randn(2, 10, 8)
    scores = torch.einsum("bh,bnh->bn", query, docs)
    values = torch.randn(2, 10)
    w, _ = differentiable_topk(scores, 3, tau=0.5)
    loss = (torch.einsum("bkn,bn->bk", w, values) ** 2).sum()
    loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("tau", [0.02, 0.5, 5.0])
def test_tau_changes_gradients_not_the_selection(tau):
    torch.manual_seed(1)
    scores = torch.randn(1, 6, requires_grad=True)
    w, idx = differentiable_topk(scores, 2, tau=tau)
    assert torch.equal(idx, scores.detach().topk(2).indices)
    (w * torch.arange(6.0)).sum().backward()
    g = scores.grad.abs().sum().item()
    assert g > 0
    # Soft picks at high temperature spread weight over many candidates: the gradient shrinks as 1/tau.
    scores2 = scores.detach().clone().requires_grad_(True)
    w2, _ = differentiable_topk(scores2, 2, tau=tau * 10)
    (w2 * torch.arange(6.0)).sum().backward()
    assert scores2.grad.abs().sum().item() < g


def test_bad_arguments():
    with pytest.raises(ValueError, match="k must be"):
        differentiable_topk(torch.zeros(1, 3), 4)
    with pytest.raises(ValueError, match="tau"):
        differentiable_topk(torch.zeros(1, 3), 1, tau=0.0)
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        differentiable_topk(torch.zeros(3), 1)


def test_flat_cosine_matches_manual_and_ignores_zero_slots():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 8)
    d = torch.randn(5, 4, 8)
    d[1, 2:] = 0  # a shorter document (length-proportional mode)
    s = flat_cosine(q, d)
    manual = torch.nn.functional.cosine_similarity(q.flatten(1)[:, None], d.flatten(1)[None], dim=-1)
    assert torch.allclose(s, manual, atol=1e-6)
    per_query = flat_cosine(q, d.unsqueeze(0).expand(2, -1, -1, -1))
    assert torch.allclose(per_query, s, atol=1e-6)


def test_the_store_numpy_score_is_the_same_function_as_the_torch_one():
    # The store scores with numpy (no torch in the query path); both must rank documents identically.
    from clara.store.search import flat_cosine_np

    torch.manual_seed(1)
    n_max, h = 4, 8
    q = torch.randn(1, n_max, h)
    lengths = [4, 2, 1, 3]
    mems = [torch.randn(n, h) for n in lengths]
    padded = torch.zeros(len(mems), n_max, h)
    for i, m in enumerate(mems):
        padded[i, : m.shape[0]] = m
    torch_scores = flat_cosine(q, padded)[0]
    np_scores = flat_cosine_np(q[0].numpy(), [m.numpy() for m in mems], n_max)
    assert np.allclose(torch_scores.numpy(), np_scores, atol=1e-6)
    # A query with fewer rows than n_max is zero-padded by both.
    short = q[:, :2]
    assert np.allclose(flat_cosine(torch.nn.functional.pad(short, (0, 0, 0, n_max - 2)), padded)[0].numpy(),
                       flat_cosine_np(short[0].numpy(), [m.numpy() for m in mems], n_max), atol=1e-6)
