"""The identical GPT-2 model in PyTorch, for side-by-side benchmarks only (never a dependency).

It loads cllmd's parameter dict (GPT-2 names, x @ W + b layout), so both start from the same
weights and any difference in loss or speed is the implementation's.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F


class TorchGPT(torch.nn.Module):
    def __init__(self, cfg, params: dict[str, np.ndarray]):
        super().__init__()
        self.cfg = cfg
        self.p = torch.nn.ParameterDict({
            name.replace(".", "_"): torch.nn.Parameter(torch.tensor(np.array(value)))
            for name, value in params.items()
        })

    def w(self, name):
        return self.p[name.replace(".", "_")]

    def forward(self, idx, targets=None):
        cfg = self.cfg
        B, T = idx.shape
        C, NH = cfg.n_embd, cfg.n_head
        x = self.w("wte")[idx] + self.w("wpe")[:T]
        for l in range(cfg.n_layer):
            p = f"h.{l}."
            h = F.layer_norm(x, (C,), self.w(p + "ln_1.weight"), self.w(p + "ln_1.bias"), 1e-5)
            qkv = h @ self.w(p + "attn.c_attn.weight") + self.w(p + "attn.c_attn.bias")
            q, k, v = qkv.split(C, dim=2)
            q, k, v = (t.view(B, T, NH, C // NH).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = y.transpose(1, 2).contiguous().view(B, T, C)
            x = x + y @ self.w(p + "attn.c_proj.weight") + self.w(p + "attn.c_proj.bias")
            h = F.layer_norm(x, (C,), self.w(p + "ln_2.weight"), self.w(p + "ln_2.bias"), 1e-5)
            h = F.gelu(h @ self.w(p + "mlp.c_fc.weight") + self.w(p + "mlp.c_fc.bias"), approximate="tanh")
            x = x + h @ self.w(p + "mlp.c_proj.weight") + self.w(p + "mlp.c_proj.bias")
        x = F.layer_norm(x, (C,), self.w("ln_f.weight"), self.w("ln_f.bias"), 1e-5)
        logits = x @ self.w("wte").T
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def configure_optimizer(self, lr, weight_decay, betas=(0.9, 0.95), eps=1e-8):
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=lr, betas=betas, eps=eps, foreach=False)


def lr_at(step, base_lr, warmup, total, min_lr):
    if step < warmup:
        return base_lr * (step + 1) / warmup
    ratio = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (base_lr - min_lr)
