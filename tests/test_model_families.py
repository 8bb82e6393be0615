"""The layer loop must match transformers for every supported family, loaded from an HF directory.

No Qwen/Mistral/Llama-3 checkpoint can be fetched here, so each family is a tiny random-weight model
of its real architecture (Qwen2's q/k/v biases, Qwen3's per-head q/k norms, Mistral's sliding-window
config) with the embedded model's tokenizer; exactness does not depend on the weight values.
"""

import pytest
import torch

FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4096}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"rope_theta": 500000.0}),
}


@pytest.fixture(params=sorted(FAMILIES))
def family_dir(request, lm, tmp_path):
    import transformers

    cfg_name, model_name, extra = FAMILIES[request.param]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=len(lm.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
        **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(cfg)
    model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    return request.param, tmp_path / "m"


def test_family_matches_transformers_and_r1_equals_full(family_dir, tmp_path):
    from daser_rag.engine.generator import CacheAwareGenerator
    from daser_rag.kv.store import KVStore
    from daser_rag.model.loader import load_model
    from daser_rag.model.runner import LayerRunner

    family, path = family_dir
    lm = load_model(path, device="cpu")
    assert lm.spec.model_type == family
    runner = LayerRunner(lm)
    ids = torch.tensor(lm.tokenizer("The pass statement does nothing at all.")["input_ids"])
    with torch.inference_mode():
        ref = lm.hf_model(ids[None]).logits[0].float()
    out = runner.forward(ids, 0, runner.new_cache(len(ids)), all_logits=True)
    assert (out - ref).abs().max().item() < 1e-4, family

    gen = CacheAwareGenerator(lm, store=KVStore(tmp_path / "c", codec="fp32"))
    chunks = ["The pass statement does nothing.", "A break ends the nearest loop.", "del removes a binding."]
    full, _ = gen.prefill("What does del do?", chunks, use_cache=False)
    gen.prefill("What does del do?", chunks)
    r1, info = gen.prefill("What does del do?", chunks, recompute_ratio=1.0)
    assert info["hits"] == 3
    assert (r1.logits - full.logits).abs().max().item() < 1e-4, family
