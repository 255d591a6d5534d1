"""
A nanoGPT-shaped decoder for CTR prediction with Dynamic Target Isolation masks.

The model never sees absolute time: a prompt (SW) or a stream (DTI) arrives as token ids plus two
per-token arrays, `item` (block index inside the prompt) and `role`. `attention_mask` turns those
into who-may-see-whom, and the CTR logit of a block is read at its [SUM] token through the tied
embeddings of <|yes|> and <|no|> (DESIGN.md sections 4 and 5).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

# token roles; the same line as in data.py (model.py never imports data.py)
TEXT, SUM, LABEL, PAD = 0, 1, 2, 3


@dataclass
class GPTConfig:
    vocab_size: int = 50261   # GPT-2's 50257 + [SUM], <|yes|>, <|no|>, [PAD]
    yes_id: int = 50258
    no_id: int = 50259
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    n: int = 20               # context blocks each target may see
    mask: str = 'isolated'    # 'isolated' (exact) | 'window' (the paper's)
    pos: str = 'alibi'        # 'alibi' (relative) | 'learned' (absolute, nanoGPT's wpe)
    block_size: int = 2048    # longest prompt; only learned positions are bounded by it
    dropout: float = 0.0

# -----------------------------------------------------------------------------
# attention masks: boolean algebra over (query, key) index grids


def attention_mask(item, role, n, kind):
    """(B, T) item and role -> (B, 1, T, T) bool, True where query q may attend key k.

    Both masks share three rules: nothing attends another block's [SUM] ([SUM] reads, it is never
    read), nothing but a PAD query itself attends PAD, and a PAD query sees itself only (so no
    row is fully masked). Below, n=1 and blocks of two text tokens t, then S=[SUM], L=label:

    window: causal, and at most n blocks back        isolated: text/label see their own block,
            (the paper's windowed causal attention)           [SUM] gathers the window
                   keys                                             keys
              t t S L t t S L t t S L                          t t S L t t S L t t S L
        t0    x . . . . . . . . . . .                    t0    x . . . . . . . . . . .
        t0    x x . . . . . . . . . .                    t0    x x . . . . . . . . . .
        S0    x x x . . . . . . . . .                    S0    x x x . . . . . . . . .
        L0    x x . x . . . . . . . .                    L0    x x . x . . . . . . . .
        t1    x x . x x . . . . . . .                    t1    . . . . x . . . . . . .
        t1    x x . x x x . . . . . .                    t1    . . . . x x . . . . . .
        S1    x x . x x x x . . . . .                    S1    x x . x x x x . . . . .
        L1    x x . x x x . x . . . .                    L1    . . . . x x . x . . . .
        t2    . . . . x x . x x . . .                    t2    . . . . . . . . x . . .
        t2    . . . . x x . x x x . .                    t2    . . . . . . . . x x . .
        S2    . . . . x x . x x x x .                    S2    . . . . x x . x x x x .
        L2    . . . . x x . x x x . x                    L2    . . . . . . . . x x . x

    With one layer both give every [SUM] exactly its sliding-window view. With more layers,
    `window` leaks: t1 saw block 0, so S2 reads block 0 through t1's hidden state. `isolated`
    cannot leak: a text or label state depends on its own block only.
    """
    T = item.size(1)
    pos = torch.arange(T, device=item.device)
    qpos, kpos = pos[:, None], pos[None, :]                      # (T, 1), (1, T)
    qi, ki = item[:, :, None], item[:, None, :]                  # (B, T, 1), (B, 1, T)
    qr, kr = role[:, :, None], role[:, None, :]                  # (B, T, 1), (B, 1, T)
    self_ = qpos == kpos                                         # (T, T)
    readable = (kr != SUM) & (kr != PAD)                         # (B, 1, T)
    back = qi - ki                                               # (B, T, T) blocks between q and k
    if kind == 'window':
        allowed = (kpos <= qpos) & (back <= n) & readable
    elif kind == 'isolated':
        own_block = (back == 0) & (kpos <= qpos) & readable
        window = (back >= 1) & (back <= n) & readable            # blocks i-n .. i-1, text and label
        allowed = torch.where(qr == SUM, (own_block & (kr == TEXT)) | window, own_block)
    else:
        raise ValueError(f'unknown mask {kind!r}')
    allowed = torch.where(qr == PAD, self_, allowed | (self_ & (qr == SUM)))  # (B, T, T)
    return allowed[:, None]                                      # (B, 1, T, T)


def alibi_slopes(n_head):
    """ALiBi's per-head slopes 2^(-8(h+1)/H)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / n_head) for h in range(n_head)])


def attention_bias(allowed, n_head, pos):
    """Bool mask -> what SDPA gets: the mask itself, or with ALiBi a float mask that holds the
    bias -slope_h * (q - k) where allowed and -inf elsewhere: (B, 1|nh, T, T)."""
    if pos != 'alibi':
        return allowed
    T = allowed.size(-1)
    dist = torch.arange(T, device=allowed.device)
    dist = (dist[:, None] - dist[None, :]).float()                                  # (T, T)
    bias = -alibi_slopes(n_head).to(allowed.device)[:, None, None] * dist           # (nh, T, T)
    return bias.masked_fill(~allowed, float('-inf'))                                # (B, nh, T, T)

# -----------------------------------------------------------------------------
# the decoder


class SelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x, attn_mask):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)                     # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)        # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)        # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)        # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                       # (B, T, C)
        return self.resid_dropout(self.c_proj(y))                              # (B, T, C)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))             # (B, T, C)


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask):
        x = x + self.attn(self.ln_1(x), attn_mask)                             # (B, T, C)
        return x + self.mlp(self.ln_2(x))                                      # (B, T, C)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.mask in ('isolated', 'window') and config.pos in ('alibi', 'learned')
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        if config.pos == 'learned':
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith('c_proj.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, item, role):
        """(B, T) token ids, block indices and roles -> (B, T) CTR logits, meaningful at [SUM]."""
        B, T = idx.size()
        cfg = self.config
        x = self.transformer.wte(idx)                                          # (B, T, C)
        if cfg.pos == 'learned':
            if T > cfg.block_size:
                raise ValueError(f'prompt of {T} tokens is longer than block_size={cfg.block_size}')
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device))   # (B, T, C)
        x = self.transformer.drop(x)
        allowed = attention_mask(item, role, cfg.n, cfg.mask)                  # (B, 1, T, T)
        attn_mask = attention_bias(allowed, cfg.n_head, cfg.pos)               # (B, 1|nh, T, T)
        for block in self.transformer.h:
            x = block(x, attn_mask)                                            # (B, T, C)
        x = self.transformer.ln_f(x)                                           # (B, T, C)
        # the LM head restricted to two rows: logit(yes) - logit(no), never the whole vocabulary
        wte = self.transformer.wte.weight
        return x @ (wte[cfg.yes_id] - wte[cfg.no_id])                          # (B, T)


def ctr_loss(logits, label):
    """Binary cross-entropy over target [SUM] positions only (label >= 0)."""
    target = label >= 0                                                        # (B, T)
    return F.binary_cross_entropy_with_logits(logits[target], label[target].float())
