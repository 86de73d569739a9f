"""The PyTorch models of ``_torch_peers.py`` (imported only when a peer runs: torch is an
optional extra): the time-indexed model, solved by torchdiffeq or by a hand-written Euler
loop, and GPT-2. Same maths as ode-lm's ``time_indexed`` and ``standard`` families, written
independently in PyTorch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def attention(x, qkv, heads):
    b, n, d = x.shape
    q, k, v = (z.view(b, n, heads, d // heads).transpose(1, 2) for z in qkv.split(d, -1))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, d)


class TimeIndexed(nn.Module):
    """dx/dt = f(t, x) = attn(LN1 x) + mlp(LN2 x), each dense layer's output gated per
    feature by sigmoid(MLP(sin/cos features of t)); x(0) = token + position embedding."""

    def __init__(self, vocab, d, heads, steps, seq, solver, temb=32, hidden=64):
        super().__init__()
        self.heads, self.steps, self.solver = heads, steps, solver
        self.gate_sizes = [3 * d, d, 4 * d, d]
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(seq, d))
        self.ln_attn, self.ln_mlp, self.ln_f = (nn.LayerNorm(d) for _ in range(3))
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.mod = nn.Sequential(nn.Linear(temb, hidden), nn.SiLU(), nn.Linear(hidden, sum(self.gate_sizes)))
        self.register_buffer("freqs", 100.0 ** (torch.arange(temb // 2) / max(temb // 2 - 1, 1)))

    def field(self, t, x):
        angles = t * self.freqs
        g_qkv, g_proj, g_fc1, g_fc2 = torch.sigmoid(
            self.mod(torch.cat([angles.sin(), angles.cos()]))).split(self.gate_sizes)
        qkv = F.linear(self.ln_attn(x), self.qkv.weight) * g_qkv + self.qkv.bias
        a = F.linear(attention(x, qkv, self.heads), self.proj.weight) * g_proj + self.proj.bias
        h = F.gelu(F.linear(self.ln_mlp(x), self.fc1.weight) * g_fc1 + self.fc1.bias, approximate="tanh")
        m = F.linear(h, self.fc2.weight) * g_fc2 + self.fc2.bias
        return (a + m).to(x.dtype)

    def forward(self, tokens):
        x = self.tok(tokens) + self.pos[: tokens.shape[1]]
        h = 1.0 / self.steps
        if self.solver == "torchdiffeq":
            from torchdiffeq import odeint
            ts = torch.tensor([0.0, 1.0], device=tokens.device)
            x = odeint(self.field, x, ts, method="euler", options={"step_size": h})[-1]
        else:  # the same Euler steps, written out
            for n in range(self.steps):
                x = x + h * self.field(torch.tensor(n * h, device=x.device), x)
        return self.ln_f(x) @ self.tok.weight.T


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.c_proj(attention(x, self.c_attn(self.ln_1(x)), self.heads))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    def __init__(self, vocab, d, heads, layers, seq):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        for module in self.modules():  # GPT-2's initialisation
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        for block in self.blocks:  # residual projections scaled by 1 / sqrt(2 layers)
            for proj in (block.c_proj, block.mlp_proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * layers))

    def forward(self, tokens):
        x = self.wte(tokens) + self.wpe.weight[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T  # tied head
