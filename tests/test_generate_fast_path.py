"""generate()'s fast path: the fused h-weight [W_g ; C] is built once per call, not once per block per token,
with the same tokens and logits as the slow path; a changed weight is always seen; greedy is the default."""

import copy

import pytest
import torch

from mmrec import MMRecConfig, MMRecModel
from mmrec.model import MMRecBlock


def small_config(**overrides):
    # memory_segment_len 5: decoding crosses memory writes
    values = dict(vocab_size=61, model_dim=32, num_layers=2, num_heads=4, ffn_dim=48, memory_slots=32,
                  hds_levels=3, memory_segment_len=5, dropout=0.0, ffn_act="silu", ffn_gated=True,
                  tie_word_embeddings=False)
    values.update(overrides)
    return MMRecConfig(**values)


def model_and_prompt(seed, batch, prompt_len=6):
    torch.manual_seed(seed)
    model = MMRecModel(small_config()).eval()
    return model, torch.randint(0, 61, (batch, prompt_len))


@torch.no_grad()
def slow_greedy(model, prompt, n):
    """The reference: prefill, then one model(token, state) call per token, the h-weight concatenated on
    every call (no fused_weights scope); returns the tokens and each step's logits."""
    logits, state = model(prompt)
    seq, step_logits = prompt, [logits[:, -1]]
    for i in range(n):
        token = step_logits[-1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, token], 1)
        if i + 1 < n:
            logits, state = model(token, state)
            step_logits.append(logits[:, -1])
    return seq, torch.stack(step_logits, 1)


@torch.no_grad()
def fused_greedy(model, prompt, n):
    """The same loop inside model.fused_weights() (what generate() runs)."""
    with model.fused_weights():
        assert all(block._w_h is not None for block in model.blocks)
        return slow_greedy(model, prompt, n)


@pytest.fixture
def fuse_calls(monkeypatch):
    calls = []
    original = MMRecBlock._fuse_h_weight

    def counting(self, *sources):
        calls.append(self)
        return original(self, *sources)

    monkeypatch.setattr(MMRecBlock, "_fuse_h_weight", counting)
    return calls


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generate_equals_the_slow_path_and_the_full_forward(seed, batch):
    model, prompt = model_and_prompt(seed, batch)
    n = 12
    slow_tokens, slow_logits = slow_greedy(model, prompt, n)
    fast_tokens, fast_logits = fused_greedy(model, prompt, n)
    assert torch.equal(fast_tokens, slow_tokens)
    assert torch.equal(fast_logits, slow_logits)  # same weights bit for bit, same ops
    assert torch.equal(model.generate(prompt, n, temperature=0), slow_tokens)
    with torch.no_grad():  # one call on the whole sequence gives the same per-step logits
        full, _ = model(slow_tokens[:, :-1])
    torch.testing.assert_close(fast_logits, full[:, prompt.shape[1] - 1:], rtol=1e-5, atol=1e-5)
    assert all(block._w_h is None for block in model.blocks)  # dropped when generate returns


def test_generate_builds_the_fused_weight_once_per_call(fuse_calls):
    model, prompt = model_and_prompt(3, 2)
    model.generate(prompt, 20)
    assert len(fuse_calls) == model.config.num_layers  # not num_layers x (1 + steps)
    fuse_calls.clear()
    with torch.no_grad():
        model(prompt)  # outside the scope: concatenated on every call, as before
        model(prompt[:, :1])
    assert len(fuse_calls) == 2 * model.config.num_layers


def test_nested_scopes_keep_the_outer_copies(fuse_calls):
    model, prompt = model_and_prompt(4, 1)
    with model.fused_weights():
        outer = [block._w_h[0] for block in model.blocks]
        model.generate(prompt, 5)
        assert [block._w_h[0] for block in model.blocks] == outer
    assert len(fuse_calls) == model.config.num_layers
    assert all(block._w_h is None for block in model.blocks)


def test_greedy_is_the_default():
    model, prompt = model_and_prompt(5, 2)
    expected, _ = slow_greedy(model, prompt, 10)
    torch.manual_seed(123)
    first = model.generate(prompt, 10)
    torch.manual_seed(456)
    second = model.generate(prompt, 10, top_k=5)  # top_k alone does not turn sampling on
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_sampling_only_with_a_positive_temperature():
    model, prompt = model_and_prompt(6, 2)
    greedy = model.generate(prompt, 16)
    a = model.generate(prompt, 16, temperature=5.0, generator=torch.Generator().manual_seed(0))
    b = model.generate(prompt, 16, temperature=5.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, greedy)
    assert torch.equal(model.generate(prompt, 16, temperature=1.0, top_k=1), greedy)  # top_k=1 is greedy


@pytest.mark.parametrize("n", [0, 1, 2])
def test_short_generations(n):
    model, prompt = model_and_prompt(7, 2)
    expected, _ = slow_greedy(model, prompt, n)
    out = model.generate(prompt, n)
    assert out.shape == (2, prompt.shape[1] + n) and torch.equal(out, expected)


def test_generate_sees_an_optimizer_step():
    model, prompt = model_and_prompt(8, 2)
    before = model.generate(prompt, 10)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=5.0)
    for _ in range(2):
        optimizer.zero_grad()
        logits, _ = model(prompt)
        logits.logsumexp(-1).mean().backward()
        optimizer.step()
    reference = copy.deepcopy(model).eval()
    expected, _ = slow_greedy(reference, prompt, 10)
    assert not torch.equal(expected, before)  # the step changed what greedy decoding gives
    assert torch.equal(model.generate(prompt, 10), expected)
    assert model.training  # generate restores the mode


def test_an_in_place_update_inside_the_scope_is_seen():
    model, prompt = model_and_prompt(9, 1)
    with model.fused_weights(), torch.no_grad():
        model(prompt)
        for block in model.blocks:  # in place, as optimizers and load_state_dict do: same data_ptr
            block.W_g.weight.mul_(-3.0)
            block.mdi.W_g.weight[:, model.config.model_dim:].add_(0.5)
        inside, _ = model(prompt)
    with torch.no_grad():
        outside, _ = model(prompt)
    assert torch.equal(inside, outside)


def test_a_replaced_weight_inside_the_scope_is_seen():
    model, prompt = model_and_prompt(10, 1)
    with model.fused_weights(), torch.no_grad():
        for block in model.blocks:  # new storage; the old one is kept alive, so no address reuse
            block.W_g.weight.data = torch.randn_like(block.W_g.weight)
        inside, _ = model(prompt)
    with torch.no_grad():
        outside, _ = model(prompt)
    assert torch.equal(inside, outside)


def test_generate_after_load_state_dict_uses_the_loaded_weights():
    model, prompt = model_and_prompt(11, 2)
    other, _ = model_and_prompt(12, 2)
    model.generate(prompt, 8)
    expected = other.generate(prompt, 8)
    assert not torch.equal(model.generate(prompt, 8), expected)
    model.load_state_dict(other.state_dict())
    assert torch.equal(model.generate(prompt, 8), expected)
    with model.fused_weights():  # also when it happens inside the scope
        model.load_state_dict(model_and_prompt(11, 2)[0].state_dict())
        again = model.generate(prompt, 8)
    assert torch.equal(again, model_and_prompt(11, 2)[0].generate(prompt, 8))


def test_generate_after_to_another_dtype():
    model, prompt = model_and_prompt(13, 2)
    with model.fused_weights():
        model.double()  # inside the scope: the float32 copies no longer match
        tokens, logits = slow_greedy(model, prompt, 8)
        assert logits.dtype == torch.float64
    expected, expected_logits = slow_greedy(model, prompt, 8)
    assert torch.equal(tokens, expected) and torch.equal(logits, expected_logits)
    assert torch.equal(model.generate(prompt, 8), expected)


def test_gradients_flow_through_the_h_weight_inside_the_scope():
    model, prompt = model_and_prompt(14, 2)
    model.train()

    def grads():
        model.zero_grad()
        logits, _ = model(prompt)
        logits.square().mean().backward()
        return [(b.W_g.weight.grad.clone(), b.mdi.W_g.weight.grad.clone()) for b in model.blocks]

    outside = grads()
    with model.fused_weights():
        inside = grads()
    for (a, b), (c, d) in zip(outside, inside):
        assert a.abs().sum() > 0 and torch.equal(a, c) and torch.equal(b, d)


def test_inference_mode_weights():
    with torch.inference_mode():  # inference tensors keep no version counter
        model, prompt = model_and_prompt(15, 2)
        expected, _ = slow_greedy(model, prompt, 8)
        assert torch.equal(model.generate(prompt, 8), expected)
    assert torch.equal(model.generate(prompt, 8), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("batch", [1, 2])
def test_gpu_graphed_generate_equals_the_slow_path(batch):
    """On a GPU the decode steps replay as one CUDA graph captured inside the fused-weight scope."""
    torch.manual_seed(16)
    model = MMRecModel(small_config(memory_segment_len=6)).cuda().eval()
    prompt = torch.randint(0, 61, (batch, 4), device="cuda")
    expected, _ = slow_greedy(model, prompt, 20)
    assert torch.equal(model.generate(prompt, 20), expected)
    assert torch.equal(model.generate(prompt, 20, cuda_graph=False), expected)
    with torch.no_grad():
        for block in model.blocks:
            block.W_g.weight.mul_(2.0)
    expected, _ = slow_greedy(model, prompt, 20)
    assert torch.equal(model.generate(prompt, 20), expected)
