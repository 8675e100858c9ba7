"""LoRA adapters, an optional part beside common.py: an adapter added to a model (peft), the note on a --lora-r
run's learning rate, and a trained adapter merged into its model's weights for a plain checkpoint.

common.py imports this file only for a run with --lora-r (common.check_lora, add_lora, merged_state_dict); a run
without it trains the weights themselves and never reads it. Without this file beside common.py, --lora-r stops with
one line that names it."""

from common import fail, peft_model

LORA_LR_FACTOR = 10  # the learning rate at which LoRA matched the full fine-tune's gain, ÷ the full fine-tune's: README


def lora_learning_rate_note(lora_r: int, learning_rate: float, full_default: float | None) -> str | None:
    """The note a --lora-r run gets when its learning rate is the script's full fine-tune default, else None: an
    adapter (B starts at 0, α / r scales its update) moves the policy far less per step at the same learning rate."""
    if not lora_r or full_default is None or learning_rate != full_default:
        return None
    return (
        f"note: --lora-r {lora_r} at --learning-rate {learning_rate:g}, the full fine-tune's default: adapters usually "
        f"need about {LORA_LR_FACTOR}× it, e.g. --learning-rate {LORA_LR_FACTOR * learning_rate:g} (on the built-in "
        f"task, APA with --lora-r 16 got 8% of the full fine-tune's held-out reward gain at 1×, 68% at 10×, 107% at "
        f"30×; README: LoRA learning rates)"
    )


def add_lora(model, kind: str, r: int, alpha: float, dropout: float, target_modules, quantized=False):
    """The model with a LoRA adapter (Hu et al. 2021) of rank `r` on `target_modules` (`all-linear`: every linear
    layer but the output head), scaled by alpha / r: only the adapter trains, and a `score` model's 1-output head
    (a value model's) trains in full beside it. r = 0: the model as it is. Quantised weights are first readied for
    training (norms in float32) as QLoRA does."""
    if not r:
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers.pytorch_utils import Conv1D

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules="all-linear" if list(target_modules) == ["all-linear"] else list(target_modules),
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),  # GPT-2's layers store weight.T
        task_type="CAUSAL_LM" if kind == "causal" else "SEQ_CLS",
        bias="none",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # a target that this architecture does not have
        fail(
            f"--lora-target-modules {' '.join(target_modules)}: {str(e).splitlines()[0][:200]}; name this model's "
            f"linear layers (e.g. q_proj v_proj) or pass all-linear"
        )


def merged_state_dict(state: dict, model) -> dict:
    """A PeftModel's state dict (`state`, possibly gathered from ZeRO-3 shards) as the plain transformers model's:
    each adapted weight W + (α / r) · B A (transposed for fan-in-fan-out layers), the keys without peft's prefixes,
    a fully trained head (modules_to_save) in place of its original. `from_pretrained` loads the result as it is."""
    config = peft_model(model).peft_config["default"]
    scaling = config.lora_alpha / config.r
    merged = {}
    for key, value in state.items():
        name = key.removeprefix("base_model.model.")
        if ".lora_" in name or ".original_module." in name:
            continue
        name = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        lora_a = key.replace(".base_layer.weight", ".lora_A.default.weight")
        lora_b = key.replace(".base_layer.weight", ".lora_B.default.weight")
        if key.endswith(".base_layer.weight") and lora_a in state:
            delta = state[lora_b].float() @ state[lora_a].float()
            value = (value.float() + scaling * (delta.T if config.fan_in_fan_out else delta)).to(value.dtype)
        merged[name] = value.contiguous()
    return merged
