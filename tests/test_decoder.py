"""common/decoder.py: the attention decoder's hand-written backward pass against SpeechBrain's step-by-step graph."""
import pytest
import torch
from speechbrain.nnet.RNN import AttentionalRNNDecoder as SBDecoder

from common.decoder import AttentionalRNNDecoder

KW = dict(enc_dim=32, input_size=16, rnn_type="gru", attn_type="location", hidden_size=24, attn_dim=12,
          num_layers=1, channels=5, kernel_size=7, re_init=True, dropout=0.0)


def _pair(**over):
    torch.manual_seed(0)
    ref = SBDecoder(**{**KW, **over})
    with torch.no_grad():  # biases away from their zero init, so that every term of the gradient counts
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fast = AttentionalRNNDecoder(**{**KW, **over})
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _run(model, emb, enc, lens, g_out, g_attn):
    emb = emb.clone().requires_grad_(True)
    enc = enc.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out, attn = model(emb, enc, lens)
    ((out * g_out).sum() + (attn * g_attn).sum()).backward()
    return out.detach(), attn.detach(), emb.grad, enc.grad, {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize("scaling", [1.0, 1.7])
def test_fast_decoder_gives_speechbrains_outputs_and_every_gradient(monkeypatch, scaling):
    ref, fast = _pair(scaling=scaling)
    assert list(fast.state_dict()) == list(ref.state_dict())  # checkpoints load either way
    torch.manual_seed(1)
    B, U, T = 3, 6, 20
    emb, enc = torch.randn(B, U, 16), torch.randn(B, T, 32)
    lens = torch.tensor([1.0, 0.7, 0.45])  # padded rows: masked frames get no attention, no gradient
    g_out, g_attn = torch.randn(B, U, 24), torch.randn(B, U, T)
    want = _run(ref, emb, enc, lens, g_out, g_attn)
    # the fast path must not fall back on SpeechBrain's loop
    monkeypatch.setattr(SBDecoder, "forward", lambda *a, **k: pytest.fail("fell back to SpeechBrain's loop"))
    got = _run(fast, emb, enc, lens, g_out, g_attn)
    for name, w, g in [("outputs", want[0], got[0]), ("attention", want[1], got[1]),
                       ("d embeddings", want[2], got[2]), ("d encoder", want[3], got[3])]:
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-4), name
    assert got[1][2, :, 9:].abs().max() == 0  # row 2 has 9 real frames
    assert set(got[4]) == set(want[4])
    for k in want[4]:
        assert got[4][k] is not None, k
        assert torch.allclose(got[4][k], want[4][k], atol=1e-5, rtol=1e-4), k
    # inference: the loop without the saved intermediates gives the same values
    with torch.no_grad():
        out, attn = fast(emb, enc, lens)
    assert torch.allclose(out, want[0], atol=1e-5) and torch.allclose(attn, want[1], atol=1e-6)


def test_fast_decoder_falls_back_where_it_does_not_apply():
    _, fast = _pair(dropout=0.2)
    fast.train()
    assert not fast._fast("cpu")  # active dropout: SpeechBrain's loop draws the masks
    fast.eval()
    assert fast._fast("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fast._fast("cpu")
    _, lstm = _pair(rnn_type="lstm")
    assert not lstm._fast("cpu")
    from speechbrain.nnet.adapters import LoRA

    _, adapted = _pair()
    adapted.attn.mlp_dec = LoRA(adapted.attn.mlp_dec, rank=2)  # LoRA (common/finetune.py) wraps nn.Linear layers
    assert not adapted._fast("cpu")
    out, attn = adapted(torch.randn(2, 4, 16), torch.randn(2, 10, 32), torch.ones(2))  # SpeechBrain's path runs
    assert out.shape == (2, 4, 24) and torch.allclose(attn.sum(-1), torch.ones(2, 4))
