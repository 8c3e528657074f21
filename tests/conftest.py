"""Shared fixtures: tiny random GPT-NeoX checkpoints written by `transformers` itself."""
import pytest
import torch

# The test models are tiny: one thread is faster than two, and avoids OpenMP threads spinning against
# each other when the machine is shared (measured here: up to 20x slower with 2 threads under load).
torch.set_num_threads(1)


def write_hf_model(path, seed=0, parallel=True, rotary_pct=0.25, tie=False, vocab=61, d=32, layers=2,
                   heads=4, d_mlp=48):
    """A random GPTNeoXForCausalLM saved by transformers (weights perturbed so nothing is at its init)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=d_mlp, rotary_pct=rotary_pct, max_position_embeddings=64,
                        use_parallel_residual=parallel, tie_word_embeddings=tie)
    hf = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(path)
    return hf


@pytest.fixture
def tiny_model_dir(tmp_path):
    write_hf_model(tmp_path / "model", seed=int(torch.randint(0, 10**6, ()).item()))
    return tmp_path / "model"
