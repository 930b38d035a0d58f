"""MM-Rec in transformers: `import mmrec.hf`, then AutoConfig / AutoModelForCausalLM / AutoTokenizer load a
converted directory (`mmrec shard-convert` output) as it is. PEFT adapters and lm-evaluation-harness work on
the result (docs/hf.md).

Nothing else in mmrec imports this package: `import mmrec` and the converter never load transformers.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration import MMRecConfig
from .modeling import MMRecCache, MMRecCausalLMOutput, MMRecForCausalLM

AutoConfig.register("mmrec", MMRecConfig, exist_ok=True)
AutoModelForCausalLM.register(MMRecConfig, MMRecForCausalLM, exist_ok=True)

# Modules a LoRA adapter may wrap. W_g and mdi.W_g are left out on purpose: the recurrence reads their
# weights directly (MMRecForCausalLM refuses an adapter there rather than ignore it).
LORA_TARGET_MODULES = ["W_q", "W_k", "W_v", "W_z", "W_o", "ffn.0", "ffn.3"]

__all__ = ["LORA_TARGET_MODULES", "MMRecCache", "MMRecCausalLMOutput", "MMRecConfig", "MMRecForCausalLM"]
