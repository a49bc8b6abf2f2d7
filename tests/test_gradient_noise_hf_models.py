"""GradientNoise on real Hugging Face architectures (tiny configs, no download): GPT-2 (Conv1D projections,
token embedding tied to the head) and Qwen2 (Llama-style RMSNorm classes, tied embedding) are measured
per example on every parameter at K = 1, exactly: against torch.func per-example gradients, where each
example's loss is the mean over its own tokens (equal lengths: the batch loss is the mean of those)."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.trainer_helpers import one_torch_thread
from trainer.noise import GradientNoise

transformers = pytest.importorskip("transformers")
N, T, VOCAB = 8, 12, 64


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=16,
                                   tie_word_embeddings=True)
    return transformers.Qwen2ForCausalLM(cfg)


def _per_example_grads(model, inputs) -> torch.Tensor:
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, one):
        return functional_call(model, p, (), {k: v[None] for k, v in one.items()}).loss

    g = vmap(grad(loss_one), in_dims=(None, 0))(params, inputs)
    return torch.cat([g[k].reshape(N, -1).double() for k in params], 1)


@pytest.mark.parametrize("name", ["gpt2", "qwen2"])
def test_tiny_hugging_face_language_models_are_measured_per_example_and_exactly(name):
    model = _model(name)
    ids = torch.randint(0, VOCAB, (N, T), generator=torch.Generator().manual_seed(1))
    # positions as (N, T) ids: looked up once as (1, T) and broadcast, they have no per-example gradient
    inputs = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(T).expand(N, T)}
    with one_torch_thread(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(batching rule|performance drop).*")  # vmap over SDPA
        g = _per_example_grads(model, inputs)
        gns = GradientNoise(model)
        model(**inputs).loss.backward()
        s = gns.step()
    kinds = set(gns.covered.values())
    assert {"Conv1D", "Embedding"} <= kinds if name == "gpt2" else {"Qwen2RMSNorm", "Linear", "Embedding"} <= kinds
    assert s.complete and not s.missing and not s.micro_batch and gns.per_example_share() == 1.0
    assert float(s.g_small_sq) == pytest.approx(float(g.square().sum(1).mean()), rel=1e-4)
    assert float(s.g_big_sq) == pytest.approx(float(g.mean(0).square().sum()), rel=1e-4)
