"""PEFT LoRA on a converted MM-Rec loaded through transformers: trains, saves, reloads."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

import mmrec.hf  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from test_hf_model import converted_checkpoint  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


@pytest.fixture(scope="module")
def converted(family_models, tmp_path_factory):
    return converted_checkpoint(family_models, tmp_path_factory)


def lora(converted):
    model = AutoModelForCausalLM.from_pretrained(converted)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=mmrec.hf.LORA_TARGET_MODULES)
    return get_peft_model(model, config)


def test_lora_trains_saves_and_reloads(converted, tmp_path):
    torch.manual_seed(0)
    model = lora(converted)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    batch = torch.randint(3, 19, (2, 16), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if not p.requires_grad)

    model.eval()
    with torch.no_grad():
        tuned = model(input_ids=batch).logits
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(converted), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=batch).logits, tuned)
        plain = AutoModelForCausalLM.from_pretrained(converted)(input_ids=batch).logits
    assert not torch.allclose(plain, tuned, atol=1e-3)  # the adapter changed the model
    # Generation goes through the adapter too, one step per token.
    out = reloaded.generate(input_ids=batch[:1, :5], max_new_tokens=4, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
    assert out.shape == (1, 9) and torch.equal(out[:, :5], batch[:1, :5])


def test_lora_on_the_recurrence_weight_is_refused(converted):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(converted), LoraConfig(target_modules=["W_g"]))
    with pytest.raises(NotImplementedError, match="W_g"):
        model(input_ids=torch.tensor([[1, 3, 5]]))
