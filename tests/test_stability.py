"""mmrec.training.stability: the decay penalty, and the state growth it exists to prevent (CPU, tiny model)."""

from __future__ import annotations

import math

import pytest
import torch

from mmrec import MMRecConfig, MMRecModel
from mmrec.training.stability import DECAY_LIMIT, DecayGuard, max_decay_factor


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and much steadier on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed: int = 0) -> MMRecModel:
    torch.manual_seed(seed)
    return MMRecModel(MMRecConfig(vocab_size=61, model_dim=32, num_layers=2, num_heads=4, ffn_dim=48,
                                  memory_slots=32, hds_levels=3, memory_segment_len=50, dropout=0.0))


@torch.no_grad()
def force_decay(model: MMRecModel, gamma: float) -> None:
    """Make γ = sigmoid(W_gamma(z)) * sigmoid(W_context(k)) equal `gamma` at every position: the last
    layer of both decay MLPs gets zero weights and the bias logit(sqrt(gamma))."""
    root = math.sqrt(gamma)
    bias = math.log(root / (1 - root))
    for block in model.blocks:
        for mlp in (block.mdi.W_gamma, block.mdi.W_context):
            mlp[2].weight.zero_()
            mlp[2].bias.fill_(bias)


def max_gamma(model: MMRecModel, ids: torch.Tensor) -> float:
    """The largest γ any block shows on `ids` (through max_decay_factor = 1.1 max γ + 0.1)."""
    with torch.no_grad():
        x = model.embedding(ids)
        state = model.initial_state(ids.shape[0])
        worst = 0.0
        for block, block_state in zip(model.blocks, state):
            worst = max(worst, (max_decay_factor(block, x) - 0.1) / 1.1)
            x, _ = block(x, block_state)
    return worst


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 61, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_the_penalty_pulls_gamma_under_the_limit():
    model = tiny_model()
    force_decay(model, 0.99)
    batch = ids(2, 12)
    assert max_gamma(model, batch) == pytest.approx(0.99, abs=1e-4)
    guard = DecayGuard(list(model.blocks))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    try:
        penalties = []
        for _ in range(60):
            model(batch)
            penalty = guard.penalty()
            penalties.append(float(penalty.detach()))
            if penalties[-1] == 0:
                break
            optimizer.zero_grad()
            penalty.backward()
            optimizer.step()
    finally:
        guard.close()
    # 10 * (0.99 - 9/11)^2 summed over the 32 channels, once for each of the two blocks
    assert penalties[0] == pytest.approx(2 * 10 * 32 * (0.99 - DECAY_LIMIT) ** 2, rel=1e-3)
    assert len(penalties) < 40 and penalties[-1] < 1e-6
    assert max_gamma(model, batch) < DECAY_LIMIT + 1e-3


def test_no_penalty_under_the_limit_nor_without_grad():
    model = tiny_model()
    guard = DecayGuard(list(model.blocks))
    try:
        for gamma in (torch.sigmoid(torch.tensor(-2.0)).item() ** 2, DECAY_LIMIT - 1e-4):
            force_decay(model, gamma)
            model(ids(2, 12))
            penalty = guard.penalty()
            assert torch.is_tensor(penalty) and float(penalty.detach()) == 0.0
        force_decay(model, 0.99)
        with torch.no_grad():
            model(ids(2, 12))  # evaluation passes are not penalised
        assert guard.penalty() == 0.0
        model(ids(2, 12))
        assert float(guard.penalty().detach()) > 0
    finally:
        guard.close()
    model(ids(2, 12))
    assert guard.penalty() == 0.0  # closed: the hooks are gone


@torch.no_grad()
def carried_state_sizes(model: MMRecModel, length: int = 2000, chunk: int = 100) -> list[float]:
    """Max |h| over the blocks after every `chunk` tokens of one stream read from a fresh state."""
    stream = ids(1, length, seed=3)
    state, sizes = None, []
    for start in range(0, length, chunk):
        _, state = model(stream[:, start:start + chunk], state)
        sizes.append(max(float(s.h.abs().max()) for s in state))
    return sizes


@torch.no_grad()
def open_the_mdi_gate_never(model: MMRecModel) -> None:
    """g ≈ 0 everywhere (the factor on h is then 1.1γ + 0.1, its largest), with W_z as initialised."""
    for block in model.blocks:
        block.mdi.W_g.weight.zero_()
        block.mdi.W_g.bias.fill_(-30.0)
        assert block.W_z.weight.abs().max() > 0


def test_gamma_above_the_limit_makes_the_carried_state_blow_up():
    model = tiny_model()
    force_decay(model, 0.99)
    open_the_mdi_gate_never(model)
    assert max_decay_factor(model.blocks[0], model.embedding(ids(1, 8))) > 1.18  # 1.1 * 0.99 + 0.1
    sizes = carried_state_sizes(model)
    at_100, last = sizes[0], sizes[-1]
    assert math.isfinite(at_100)
    assert not math.isfinite(last) or last > 1e6 * at_100


@pytest.mark.parametrize("gamma", [DECAY_LIMIT - 1e-3, 0.5])
def test_gamma_under_the_limit_keeps_the_carried_state_bounded(gamma):
    model = tiny_model()
    force_decay(model, gamma)
    open_the_mdi_gate_never(model)
    assert max_decay_factor(model.blocks[0], model.embedding(ids(1, 8))) <= 1.0
    sizes = carried_state_sizes(model)
    assert all(math.isfinite(size) for size in sizes)
    assert max(sizes) < 100 * sizes[0]
