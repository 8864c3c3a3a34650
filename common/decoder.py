"""The recognizer's attention decoder with a hand-written backward pass (yaml ``dec``).

``AttentionalRNNDecoder`` is SpeechBrain's ``speechbrain.nnet.RNN.AttentionalRNNDecoder`` (same arguments, same
parameters and state-dict keys, same ``forward_step`` for beam search) whose teacher-forced ``forward`` runs the
GRU + location-aware attention recursion as one autograd function:

- the forward loop runs without autograd bookkeeping, and the parts that do not feed the recursion are computed
  for all steps at once (the token embeddings' share of the GRU input, the encoder projection, the output
  projection);
- the backward loop carries only the recurrent gradients (GRU state, context vector, attention) step by step; every
  weight gradient is one batched product over all steps afterwards. The attention's location features read the
  previous step's attention *detached* (as SpeechBrain does), so they are off the recurrent chain too.

On CPU a training step of the decoder is ~2x cheaper than SpeechBrain's step-by-step autograd graph (dozens of tiny
ops per step, each recorded) for one utterance, the recipe's usual CPU batch, and as fast for a 16-row batch, for
the same values up to float rounding (``tests/test_decoder.py`` checks outputs and
every gradient against SpeechBrain's module). Configurations the fast path does not cover (LSTM/RNN cells, content
or key-value attention, several layers, active dropout, autocast, LoRA-wrapped layers) run SpeechBrain's loop.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from speechbrain.nnet.RNN import AttentionalRNNDecoder as _SBDecoder


def _loop(gi_e, P, enc, mask, prev0, W_ic, W_hh, b_hh, W_dec, w_attn, W_conv, W_loc, W_out, b_out, scaling: float,
          keep: bool):
    """The decoder loop over ``U`` steps without autograd, time-major. ``gi_e`` [U, B, 3H]: the GRU input gates'
    token share (its bias included); ``P`` [B, T, A]: the encoder projection plus the location and decoder biases;
    ``mask`` [B, T] the real frames; ``prev0`` [B, T] the attention before the first step. Returns (h [U, B, H],
    c [U, B, A], attention [U, B, T], saved): ``saved`` holds what the backward pass needs (``keep``), else None."""
    U, B, _ = gi_e.shape
    T, A, H = P.shape[1], P.shape[2], W_hh.shape[1]
    pad = W_conv.shape[-1] // 2
    h = gi_e.new_zeros(B, H)
    c = gi_e.new_zeros(B, A)
    prev = prev0
    outside = None if bool(mask.all()) else ~mask
    W_ic_t, W_hh_t, W_dec_t, W_loc_t, W_out_t = W_ic.t(), W_hh.t(), W_dec.t(), W_loc.t(), W_out.t()
    Z = gi_e.new_empty(U, B, T, A) if keep else None  # tanh of the attention's pre-activations
    hs, cs, attns, gates, ctxs = [], [], [], [], []
    for t in range(U):
        # GRU cell, PyTorch's gate order (r, z, n): n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
        gi = torch.addmm(gi_e[t], c, W_ic_t)
        gh = torch.addmm(b_hh, h, W_hh_t)
        rz = torch.sigmoid(gi[:, : 2 * H] + gh[:, : 2 * H])
        r, zg = rz[:, :H], rz[:, H:]
        gh_n = gh[:, 2 * H:]
        n = torch.tanh(torch.addcmul(gi[:, 2 * H:], r, gh_n))
        h = torch.addcmul(n, zg, h - n)
        # location-aware attention (SpeechBrain's LocationAwareAttention; the previous attention is a constant)
        loc = torch.matmul(F.conv1d(prev.unsqueeze(1), W_conv, padding=pad).transpose(1, 2), W_loc_t)
        pre = loc.add_(P).add_(torch.matmul(h, W_dec_t).unsqueeze(1))
        z = torch.tanh(pre, out=Z[t]) if keep else torch.tanh(pre)
        s = torch.matmul(z, w_attn)
        if outside is not None:
            s = s.masked_fill_(outside, float("-inf"))
        a = torch.softmax(s * scaling if scaling != 1.0 else s, dim=-1)
        ctx = torch.bmm(a.unsqueeze(1), enc).squeeze(1)
        c = torch.addmm(b_out, ctx, W_out_t)
        if keep:
            gates.append((r, zg, n, gh_n))
            ctxs.append(ctx)
        hs.append(h)
        cs.append(c)
        attns.append(a)
        prev = a
    saved = (Z, gates, ctxs) if keep else None
    return torch.stack(hs), torch.stack(cs), torch.stack(attns), saved


class _Recursion(torch.autograd.Function):
    """(gi_e, P, enc, W_ic, W_hh, b_hh, W_dec, w_attn, W_conv, W_loc, W_out, b_out) -> (h, c, attention), time-major,
    the backward pass written out (module docstring). ``mask``, ``prev0`` and ``scaling`` are constants."""

    @staticmethod
    def forward(ctx, gi_e, P, enc, W_ic, W_hh, b_hh, W_dec, w_attn, W_conv, W_loc, W_out, b_out, mask, prev0,
                scaling):
        h, c, attn, (Z, gates, ctxs) = _loop(gi_e, P, enc, mask, prev0, W_ic, W_hh, b_hh, W_dec, w_attn, W_conv,
                                             W_loc, W_out, b_out, scaling, keep=True)
        R, ZG, N, GHN = (torch.stack(g) for g in zip(*gates))  # [U, B, H] each
        ctx.scaling = scaling
        ctx.save_for_backward(enc, W_ic, W_hh, W_dec, w_attn, W_conv, W_loc, W_out, prev0, h, c, attn, Z, R, ZG, N,
                              GHN, torch.stack(ctxs))
        return h, c, attn

    @staticmethod
    @once_differentiable
    def backward(ctx, g_h_out, g_c_out, g_attn_out):
        (enc, W_ic, W_hh, W_dec, w_attn, W_conv, W_loc, W_out, prev0, Hs, Cs, Attn, Z, R, ZG, N, GHN,
         CTX) = ctx.saved_tensors
        scaling = ctx.scaling
        U, B, H = Hs.shape
        T, A = Attn.shape[2], Cs.shape[2]
        g_h_out = torch.zeros_like(Hs) if g_h_out is None else g_h_out
        g_c_out = torch.zeros_like(Cs) if g_c_out is None else g_c_out
        g_attn_out = torch.zeros_like(Attn) if g_attn_out is None else g_attn_out
        H_prev = torch.cat([Hs.new_zeros(1, B, H), Hs[:-1]])
        # the local derivatives that do not depend on the incoming gradient, for all steps at once
        G_pre = torch.mul(Z, Z).neg_().add_(1).mul_(w_attn)  # d s / d pre = w * tanh'; x d L / d s in the loop
        F_n = (1 - ZG) * (1 - N * N)  # d h / d (n's pre-activation)
        F_z = (H_prev - N) * ZG * (1 - ZG)  # d h / d (z's pre-activation)
        F_r = GHN * R * (1 - R)  # d (n's pre-activation) / d (r's pre-activation)
        G_s, G_c, G_gi, G_gh = [], [], [], []
        g_h_next, g_c_next = Hs.new_zeros(B, H), Cs.new_zeros(B, A)
        for t in range(U - 1, -1, -1):
            # c_t = mlp_out(ctx_t), ctx_t = a_t @ enc
            g_c = g_c_out[t] + g_c_next
            g_ctx = torch.matmul(g_c, W_out)  # [B, D]
            a = Attn[t]
            g_a = torch.baddbmm(g_attn_out[t].unsqueeze(2), enc, g_ctx.unsqueeze(2)).squeeze(2)  # [B, T]
            # softmax of the energies s = w . tanh(pre)
            g_s = a * (g_a - (a * g_a).sum(-1, keepdim=True))
            if scaling != 1.0:
                g_s = g_s * scaling
            g_pre = G_pre[t].mul_(g_s.unsqueeze(2))  # [B, T, A]
            g_h = torch.addmm(g_h_out[t] + g_h_next, g_pre.sum(1), W_dec)
            # GRU cell
            g_npre = g_h * F_n[t]
            g_rpre = g_npre * F_r[t]
            g_zpre = g_h * F_z[t]
            g_gi = torch.cat([g_rpre, g_zpre, g_npre], 1)
            g_gh = torch.cat([g_rpre, g_zpre, g_npre * R[t]], 1)
            g_h_next = torch.addmm(g_h * ZG[t], g_gh, W_hh)
            g_c_next = torch.matmul(g_gi, W_ic)
            for lst, v in ((G_s, g_s), (G_c, g_c), (G_gi, g_gi), (G_gh, g_gh)):
                lst.append(v)
        G_s, G_c, G_gi, G_gh = (torch.stack(x[::-1]) for x in (G_s, G_c, G_gi, G_gh))
        # every weight gradient at once, over all steps (rows: step x batch)
        C_prev = torch.cat([Cs.new_zeros(1, B, A), Cs[:-1]])
        g_enc = torch.einsum("ubt,ubd->btd", Attn, torch.matmul(G_c, W_out))  # ctx = a @ enc
        g_W_out = torch.matmul(G_c.reshape(-1, A).t(), CTX.reshape(U * B, -1))
        g_b_out = G_c.sum((0, 1))
        g_W_ic = torch.matmul(G_gi.reshape(-1, 3 * H).t(), C_prev.reshape(-1, A))
        g_W_hh = torch.matmul(G_gh.reshape(-1, 3 * H).t(), H_prev.reshape(-1, H))
        g_b_hh = G_gh.sum((0, 1))
        g_P = G_pre.sum(0)  # [B, T, A]
        g_W_dec = torch.matmul(G_pre.sum(2).reshape(-1, A).t(), Hs.reshape(-1, H))
        G_flat = G_pre.reshape(-1, A)
        g_w_attn = torch.matmul(G_s.reshape(1, -1), Z.reshape(-1, A))[0]
        # location features loc = conv_loc(prev) @ W_loc^T, over every step's previous attention at once
        pad = W_conv.shape[-1] // 2
        prev = torch.cat([prev0.unsqueeze(0), Attn[:-1]]).reshape(U * B, 1, T)
        Q = F.conv1d(prev, W_conv, padding=pad).transpose(1, 2).reshape(U * B * T, -1)  # [N, C]
        g_W_loc = torch.matmul(Q.t(), G_flat).t()  # [A, C] (this operand order is the fast one on CPU)
        g_Q = torch.matmul(G_flat, W_loc).reshape(U * B, T, -1).transpose(1, 2)  # [UB, C, T]
        g_W_conv = torch.nn.grad.conv1d_weight(prev, W_conv.shape, g_Q, padding=pad)
        return (G_gi, g_P, g_enc, g_W_ic, g_W_hh, g_b_hh, g_W_dec, g_w_attn, g_W_conv, g_W_loc, g_W_out, g_b_out,
                None, None, None)


class AttentionalRNNDecoder(_SBDecoder):
    """SpeechBrain's ``AttentionalRNNDecoder`` (same arguments and parameters) with the fast teacher-forced
    ``forward`` described in the module docstring, where it applies (GRU, one layer, location attention, no active
    dropout, no autocast, plain ``nn.Linear``/``nn.Conv1d`` layers); elsewhere SpeechBrain's own loop."""

    def _fast(self, device_type: str) -> bool:
        at = self.attn
        cells = getattr(self.rnn, "rnn_cells", None)
        return (self.attn_type == "location" and self.rnn_type == "gru" and cells is not None and len(cells) == 1
                and type(cells[0]) is nn.GRUCell and cells[0].bias
                and all(type(m) is nn.Linear for m in (at.mlp_enc, at.mlp_dec, at.mlp_loc, at.mlp_attn, at.mlp_out))
                and type(at.conv_loc) is nn.Conv1d
                and (not self.training or self.drop.p == 0)
                and not torch.is_autocast_enabled(device_type))

    def forward(self, inp_tensor, enc_states, wav_len):
        """``inp_tensor`` [B, U, E] (embedded tokens), ``enc_states`` [B, T, D], ``wav_len`` [B] relative ->
        (outputs [B, U, hidden], attention [B, U, T]), as SpeechBrain's."""
        if not self._fast(enc_states.device.type):
            return super().forward(inp_tensor, enc_states, wav_len)
        at, cell = self.attn, self.rnn.rnn_cells[0]
        T = enc_states.shape[1]
        enc_len = torch.round(T * wav_len).long()
        mask = torch.arange(T, device=enc_states.device)[None, :] < enc_len[:, None]
        prev0 = mask.to(enc_states.dtype) / enc_len.to(enc_states.dtype)[:, None]
        E = inp_tensor.shape[-1]
        gi_e = F.linear(inp_tensor.transpose(0, 1), cell.weight_ih[:, :E], cell.bias_ih)  # [U, B, 3H]
        P = at.mlp_enc(enc_states) + (at.mlp_loc.bias + at.mlp_dec.bias)
        args = (gi_e, P, enc_states, cell.weight_ih[:, E:], cell.weight_hh, cell.bias_hh, at.mlp_dec.weight,
                at.mlp_attn.weight[0], at.conv_loc.weight, at.mlp_loc.weight, at.mlp_out.weight, at.mlp_out.bias)
        if torch.is_grad_enabled() and any(x.requires_grad for x in args):
            h, c, attn = _Recursion.apply(*args, mask, prev0, float(self.scaling))
        else:
            with torch.no_grad():
                h, c, attn, _ = _loop(*args[:3], mask, prev0, *args[3:], float(self.scaling), keep=False)
        return self.proj(torch.cat([c, h], dim=-1)).transpose(0, 1), attn.transpose(0, 1)
