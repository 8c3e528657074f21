"""Shared fixtures: tiny random GPT-NeoX checkpoints written by `transformers` itself, and seeded random draws.

Tests draw their inputs from torch's global generator (`torch.randint(...)`). Every test starts from
session seed + a hash of its name, so a failure replays on its own and tests do not depend on their order.
The session seed is fixed (0) so that CI is deterministic; MINICIRC_TEST_SEED=<int> runs with another
seed (e.g. one a failure printed), and MINICIRC_TEST_SEED=random draws a fresh one for fuzzing by hand.
The seed is printed on the last line of every run."""
import os
import random
import zlib

import pytest
import torch


def _session_seed(value):
    if value in (None, ""):
        return 0
    if value == "random":
        return random.SystemRandom().randrange(2**31)
    try:
        return int(value)
    except ValueError:
        raise pytest.UsageError(f"MINICIRC_TEST_SEED must be an integer or 'random', got {value!r}") from None


SESSION_SEED = _session_seed(os.environ.get("MINICIRC_TEST_SEED"))


def pytest_report_header(config):
    return f"minicirc test seed: {SESSION_SEED} (MINICIRC_TEST_SEED={SESSION_SEED} replays this run)"


def pytest_terminal_summary(terminalreporter):     # also under -q, which hides the header
    terminalreporter.write_line(pytest_report_header(None))


@pytest.fixture(autouse=True)
def fresh_random_draws(request):
    seed = (SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(seed)
    random.seed(seed)
    yield

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
