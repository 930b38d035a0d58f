"""The model against docs/mmrec-v1.md: names, shapes, counts, equations, state carrying and training."""

import math

import pytest
import torch

from mmrec import MMRecConfig, MMRecModel, parameter_count, parameter_specs


def small_config(**overrides):
    values = dict(vocab_size=61, model_dim=32, num_layers=2, num_heads=4, ffn_dim=48, memory_slots=32,
                  hds_levels=3, memory_segment_len=5, dropout=0.0)
    values.update(overrides)
    return MMRecConfig(**values)


def spec_count(V, D, L, F, I, gated=False, tied=True):
    """The parameter-count formula written out from the spec's table."""
    block = 5 * (D * D + D) + 2 * D + (2 * D * D + D) + 2 * (I * D + I + D * I + D) + 2 * (D * D + D)
    block += F * D + F + D * F + D
    if gated:
        block += F * D + F
    return V * D + L * block + D + (0 if tied else V * D)


def test_seven_billion_example_on_meta_without_allocating():
    config = MMRecConfig(vocab_size=32000, model_dim=4096, num_layers=24, ffn_dim=16384)
    model = MMRecModel.on_meta(config)
    assert model.num_parameters() == 7_380_553_728 == parameter_count(config)
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_names_and_shapes_match_the_schema(gated, tied):
    config = small_config(ffn_gated=gated, tie_word_embeddings=tied)
    model = MMRecModel(config)
    state_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    schema = {s.name: s.shape for s in parameter_specs(config, include_tied=True)}
    assert state_shapes == schema  # both tied names show in state_dict, like the reference
    per_block = [k for k in state_shapes if k.startswith("blocks.0.")]
    assert len(per_block) == (32 if gated else 30)
    assert (model.lm_head.weight is model.embedding.weight) == tied
    assert model.num_parameters() == spec_count(61, 32, 2, 48, 8, gated, tied) == parameter_count(config)
    assert not list(model.buffers())


def reference_logits(model, ids):
    """An independent float64 transcription of the spec's equations, one position at a time, with the
    full M-slot memory and explicit HDS pooling."""
    c = model.config
    p = {k: v.detach().double() for k, v in model.state_dict().items()}
    D, H, M, S = c.model_dim, c.num_heads, c.memory_slots, c.memory_segment_len
    act = {"gelu": lambda u: torch.nn.functional.gelu(u),
           "gelu_tanh": lambda u: torch.nn.functional.gelu(u, approximate="tanh"),
           "silu": torch.nn.functional.silu}[c.ffn_act]

    def rms(x, w):
        return w * x / (torch.sqrt((x * x).sum()) / math.sqrt(D) + c.norm_eps)

    def lin(x, name):
        return p[name + ".weight"] @ x + p[name + ".bias"]

    def gelu(u):
        return 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))

    B, T = ids.shape
    logits = torch.zeros(B, T, c.vocab_size, dtype=torch.float64)
    for b in range(B):
        states = [dict(h=torch.zeros(D, dtype=torch.float64), mem=torch.zeros(M, D, dtype=torch.float64),
                       acc=torch.zeros(D, dtype=torch.float64), n=0) for _ in range(c.num_layers)]
        for t in range(T):
            x = p["embedding.weight"][ids[b, t]]
            for i, st in enumerate(states):
                pre = f"blocks.{i}."
                xn = rms(x, p[pre + "norm1.weight"])
                q, k, v, z = (lin(xn, pre + n) for n in ("W_q", "W_k", "W_v", "W_z"))
                gamma_a = torch.sigmoid(lin(gelu(lin(z, pre + "mdi.W_gamma.0")), pre + "mdi.W_gamma.2"))
                gamma_b = torch.sigmoid(lin(gelu(lin(k, pre + "mdi.W_context.0")), pre + "mdi.W_context.2"))
                gamma = (gamma_a * gamma_b).clamp(1e-6, 1 - 1e-6)
                h_prev = st["h"]
                s = torch.sigmoid(p[pre + "W_g.weight"] @ h_prev + p[pre + "W_g.bias"])
                g = torch.sigmoid(p[pre + "mdi.W_g.weight"] @ torch.cat([z, h_prev]) + p[pre + "mdi.W_g.bias"])
                h = z * s + gamma * h_prev + 0.1 * ((1 - g) * h_prev + g * z + gamma * h_prev)
                st["h"] = h
                query = lin(h, pre + "multi_mem_attention.W_q") + 0.5 * q
                level = st["mem"]
                for _ in range(c.hds_levels - 1):
                    level = level.view(-1, 4, D).mean(dim=1)
                heads = []
                for head in range(H):
                    sl = slice(head * D // H, (head + 1) * D // H)
                    scores = level[:, sl] @ query[sl] / math.sqrt(D // H)
                    heads.append(torch.softmax(scores, 0) @ level[:, sl])
                ctx = lin(torch.cat(heads), pre + "multi_mem_attention.W_o")
                y = x + h + ctx + 0.1 * v
                u = rms(y, p[pre + "norm2.weight"])
                if c.ffn_gated:
                    inner = act(lin(u, pre + "ffn_gate")) * lin(u, pre + "ffn.0")
                else:
                    inner = act(lin(u, pre + "ffn.0"))
                out = y + lin(inner, pre + "ffn.3")
                st["acc"] = st["acc"] + out
                st["n"] += 1
                if st["n"] == S:
                    st["mem"] = (st["acc"] / S).expand(M, D).clone()
                    st["acc"] = torch.zeros_like(st["acc"])
                    st["n"] = 0
                x = out
            head_w = p["lm_head.weight"]
            logits[b, t] = head_w @ rms(x, p["norm.weight"])
    return logits


@pytest.mark.parametrize("overrides", [
    {},
    {"ffn_gated": True, "ffn_act": "silu", "tie_word_embeddings": False},
    {"ffn_act": "gelu_tanh", "hds_levels": 2, "memory_slots": 8},
])
def test_matches_an_independent_float64_implementation(overrides):
    torch.manual_seed(0)
    model = MMRecModel(small_config(**overrides)).double().eval()
    # Non-zero biases make every term of the equations matter.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.2)
    ids = torch.randint(0, 61, (2, 13))  # 13 tokens with S=5: two memory writes
    with torch.no_grad():
        logits, _ = model(ids)
    torch.testing.assert_close(logits, reference_logits(model, ids), rtol=1e-9, atol=1e-9)


def test_one_call_token_by_token_and_chunks_agree():
    torch.manual_seed(1)
    model = MMRecModel(small_config()).eval()
    ids = torch.randint(0, 61, (3, 23))
    with torch.no_grad():
        full, full_state = model(ids)
        state, steps = None, []
        for t in range(ids.shape[1]):
            out, state = model(ids[:, t:t + 1], state)
            steps.append(out)
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
        for cuts in ([4, 9, 10, 23], [7, 14, 21, 23], [1, 2, 3, 17, 23]):
            state, chunks, start = None, [], 0
            for stop in cuts:
                out, state = model(ids[:, start:stop], state)
                chunks.append(out)
                start = stop
            torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-4, atol=1e-5)
    assert [s.n for s in full_state] == [23 % 5] * 2
    assert all(s.mem.abs().sum() > 0 for s in full_state)  # memory was written


def test_dropout_only_in_training():
    torch.manual_seed(2)
    model = MMRecModel(small_config(dropout=0.5))
    ids = torch.randint(0, 61, (1, 8))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids)[0], model(ids)[0])
        model.train()
        assert not torch.equal(model(ids)[0], model(ids)[0])


def test_training_lowers_the_loss_and_checkpointing_gives_the_same_gradients():
    torch.manual_seed(3)
    config = small_config()
    model = MMRecModel(config)
    ids = torch.randint(0, 61, (4, 12))

    def loss_of(m):
        logits, _ = m(ids[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 61), ids[:, 1:].reshape(-1))

    plain = loss_of(model)
    plain.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "mdi" in n)  # autograd reaches the recurrence
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model.train()
    loss_of(model).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        optimizer.zero_grad()
        loss = loss_of(model)
        first = first if first is not None else loss.item()
        loss.backward()
        optimizer.step()
    assert loss.item() < first * 0.9


def test_generate_continues_the_prompt_with_carried_state():
    torch.manual_seed(4)
    model = MMRecModel(small_config()).eval()
    prompt = torch.randint(0, 61, (2, 6))
    greedy = model.generate(prompt, max_new_tokens=7, temperature=0)
    assert greedy.shape == (2, 13) and torch.equal(greedy[:, :6], prompt)
    with torch.no_grad():  # greedy with state == greedy recomputing the whole prefix each time
        seq = prompt
        for _ in range(7):
            logits, _ = model(seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(seq, greedy)
    sampled = model.generate(prompt, 5, temperature=1.0, top_k=1)
    assert torch.equal(sampled, greedy[:, :11])  # top_k=1 is greedy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_matches_cpu():
    torch.manual_seed(5)
    model = MMRecModel(small_config()).eval()
    ids = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        cpu, _ = model(ids)
        gpu, _ = model.cuda()(ids.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_graphed_recurrence_matches_step_by_step():
    """Long sequences take the CUDA-graph path (chunks of 64 steps); it must agree with the eager steps
    and with token-by-token calls, which never take it."""
    torch.manual_seed(6)
    model = MMRecModel(small_config(memory_segment_len=50)).cuda().eval()
    ids = torch.randint(0, 61, (2, 150), device="cuda")
    with torch.no_grad():
        full, _ = model(ids)
        state, steps = None, []
        for t in range(ids.shape[1]):
            out, state = model(ids[:, t:t + 1], state)
            steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_generate_with_decode_graph_matches_eager():
    torch.manual_seed(7)
    model = MMRecModel(small_config(memory_segment_len=6)).cuda().eval()  # memory writes every 6 tokens
    prompt = torch.randint(0, 61, (2, 4), device="cuda")
    graphed = model.generate(prompt, max_new_tokens=20, temperature=0)
    eager = model.generate(prompt, max_new_tokens=20, temperature=0, cuda_graph=False)
    assert torch.equal(graphed, eager)


def test_bf16_memory_is_the_same_whether_tokens_come_at_once_or_one_by_one():
    """acc is summed in float32, so a bf16 model's memory write does not depend on the chunking."""
    torch.manual_seed(8)
    model = MMRecModel(small_config(memory_segment_len=40)).to(torch.bfloat16).eval()
    ids = torch.randint(0, 61, (1, 45))
    with torch.no_grad():
        _, full = model(ids)
        state = None
        for t in range(ids.shape[1]):
            _, state = model(ids[:, t:t + 1], state)
    for a, b in zip(full, state):
        assert a.acc.dtype == torch.float32 and a.n == b.n == 5
        scale = a.mem.float().abs().max()
        assert (a.mem.float() - b.mem.float()).abs().max() <= 0.02 * scale
    assert full[0].h.untyped_storage().nbytes() == full[0].h.numel() * 2  # not a view of the whole sequence


def test_save_into_an_existing_checkpoint_replaces_it(tmp_path):
    first = MMRecModel(small_config())
    first.save_pretrained(tmp_path, max_shard_size="20KB")
    second = MMRecModel(small_config())
    second.save_pretrained(tmp_path)  # one shard now: the old index and shards must go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = MMRecModel.from_pretrained(tmp_path)
    assert torch.equal(loaded.embedding.weight, second.embedding.weight)
