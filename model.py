"""
A nanoGPT-shaped decoder for CTR prediction with Dynamic Target Isolation masks.

The model never sees timestamps: a prompt (SW) or a stream (DTI) arrives as token ids plus two
per-token arrays, `block` (the index of the token's block, i.e. its interaction, inside the
prompt) and `role` (TEXT, SUM, LABEL or PAD). `attention_mask` turns those two arrays into
who-may-see-whom, and the CTR logit of a block is read at its [SUM] token through the tied
embeddings of <|yes|> and <|no|>.

Reading order: pair_rules and attention_mask (the rules), ALiBi, GPT.forward; then sparse_tiles,
the fast twin of the dense mask that DTI streams train on.
"""
import math
from dataclasses import dataclass
from functools import cache, partial
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# token roles; the same line as in data.py (model.py never imports data.py)
TEXT, SUM, LABEL, PAD = 0, 1, 2, 3
# every SDPA backend but cuDNN's, which on CUDA builds an execution plan for each new shape (~25 ms
# a call on an H200): the tiles change shape every batch. CPU takes FLASH, CUDA EFFICIENT (masks).
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class GPTConfig:
    vocab_size: int = 50261   # GPT-2's 50257 + [SUM], <|yes|>, <|no|>, [PAD]
    yes_id: int = 50258
    no_id: int = 50259
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    n: int = 20               # context blocks each target may see
    mask: str = 'isolated'    # 'isolated' (exact isolation) | 'window' (DTI's windowed causal attention)
    pos: str = 'alibi'        # 'alibi' (relative) | 'learned' (absolute, nanoGPT's wpe)
    block_size: int = 2048    # longest prompt; only learned positions are bounded by it
    dropout: float = 0.0
    attn: str = 'dense'       # 'dense' (the reference) | 'sparse' (block-sparse tiles) | 'flex' (CUDA)
    tile: int = 32            # query rows per tile of the sparse path

# -----------------------------------------------------------------------------
# attention masks: boolean algebra over (query, key) index grids


def pair_rules(qb, qr, qi, kb, kr, ki, n, kind):
    """The rules of both masks for query-key pairs, elementwise on tensors that broadcast
    together: qb/kb are block indices, qr/kr roles, qi/ki token indices in the prompt.
    attention_mask applies them to every pair of a prompt, the sparse path to its tiles,
    FlexAttention to one pair at a time."""
    itself = qi == ki
    readable = (kr != SUM) & (kr != PAD)
    back = qb - kb                                                             # blocks between q and k
    if kind == 'window':
        allowed = (ki <= qi) & (back <= n) & readable
    elif kind == 'isolated':
        own_block = (back == 0) & (ki <= qi) & readable
        context = (back >= 1) & (back <= n) & readable                         # blocks i-n .. i-1
        allowed = torch.where(qr == SUM, (own_block & (kr == TEXT)) | context, own_block)
    else:
        raise ValueError(f'unknown mask {kind!r}')
    return torch.where(qr == PAD, itself, allowed | (itself & (qr == SUM)))


def allowed_pairs(qb, qr, qi, kb, kr, ki, n, kind):
    """pair_rules on a grid: queries (..., Q) against keys (..., K) -> (..., Q, K) bool."""
    return pair_rules(qb[..., :, None], qr[..., :, None], qi[..., :, None],    # (..., Q, 1)
                      kb[..., None, :], kr[..., None, :], ki[..., None, :], n, kind)  # (..., 1, K)


def attention_mask(block, role, n, kind):
    """(B, T) block and role -> (B, 1, T, T) bool, True where query q may attend key k.

    Both masks share three rules: no token but a [SUM] itself reads a [SUM] ([SUM] reads, it is
    never read), nothing but a PAD query itself attends PAD, and a PAD query sees itself only (so
    no row is fully masked). Below, n=1 and blocks of two text tokens t, then S=[SUM], L=label:

    window: causal, and at most n blocks back        isolated: text/label see their own block,
            (DTI's windowed causal attention)                 [SUM] gathers the window
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
    i = torch.arange(block.size(1), device=block.device).expand_as(block)     # (B, T)
    return allowed_pairs(block, role, i, block, role, i, n, kind)[:, None]     # (B, 1, T, T)


def alibi_slopes(n_head):
    """ALiBi's per-head slopes 2^(-8(h+1)/H)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / n_head) for h in range(n_head)])


def sdpa_mask(allowed, qi, ki, slopes=None):
    """Bool (B, ..., Q, K) -> what SDPA takes: (B, 1, ..., Q, K) bool, or with ALiBi slopes (nh,)
    a float mask holding the bias -slope_h * (q - k) where allowed, -inf elsewhere: (B, nh, ..., Q, K)."""
    if slopes is None:
        return allowed[:, None]                                                # (B, 1, ..., Q, K)
    dist = qi.to(slopes.dtype)[..., :, None] - ki.to(slopes.dtype)[..., None, :]  # (B, ..., Q, K)
    bias = -slopes.view(-1, *[1] * (allowed.dim() - 1)) * dist[:, None]        # (B, nh, ..., Q, K)
    return bias.masked_fill_(~allowed[:, None], float('-inf'))                 # (B, nh, ..., Q, K)

# -----------------------------------------------------------------------------
# block-sparse attention: the fast twin of the dense mask. The masks are block-structured, so
# compute only the key ranges a rule can reach. tests/test_sparse.py proves it equal to the dense
# reference (test_sparse_equals_dense_outputs_and_gradients_exactly: 1e-10 in float64).


class Tiles(NamedTuple):
    """One group of query rows of the block-sparse path, cut into tiles of `tile` rows."""
    rows: torch.Tensor  # (B, tiles*tile) long: the query index in each slot, tile after tile
    real: torch.Tensor  # (B, tiles*tile) bool: False for filler slots after the group's last row
    keys: torch.Tensor  # (tiles, K) long: the keys each tile reads, its range first, then filler
    mask: torch.Tensor  # (B, nh*tiles, tile, K) SDPA mask: bool, or float with the ALiBi bias


def sparse_tiles(block, role, n, kind, n_head, slopes=None, tile=32):
    """The tiles of the block-sparse path: a list of Tiles, one per group of query rows, built once
    per forward and shared by every layer. No (T, T) mask is ever built.

    Groups. Under `window` every real row is one group that may read n blocks back (reach n).
    Under `isolated` the [SUM] rows form one group with reach n, and the text and label rows
    another with reach 0: they read their own block only, so their tiles stay narrow. PAD rows
    are in no group: they attend only themselves, so their output is their own value.

    Rows and filler. Each group's rows are moved to the front of a (B, T) ordering (stable, so
    in token order) and cut into tiles of `tile` slots. A prompt with fewer rows than the longest
    one in the batch fills its last slots with whatever follows; `real` is False in those filler
    slots, whose mask row is all True (never a fully masked row) and whose output is thrown away.

    Key ranges. Every row q of block b may read keys from the first token of block b - reach up
    to q itself (causality), so a tile reads one contiguous range [lo, hi): lo = the first token
    of the oldest block any real row of the tile may read (in any prompt of the batch), hi = one
    past its last real row. The first token of block b - reach is found by binary search in
    `mono`, the block index made non-decreasing by giving PAD tokens a block past every real one.
    Ranges of one group are padded to the longest (K) with filler keys that the mask hides, and
    the per-pair rules (allowed_pairs) remove what a range holds but a row may not read (text of
    the tile's older blocks, another block's [SUM]). One SDPA call computes every tile of a group."""
    B, T = block.shape
    mono = torch.where(role == PAD, block.max() + n + 2, block).contiguous()  # (B, T) non-decreasing
    nonpad = role != PAD
    groups = [(nonpad & (role == SUM), n), (nonpad & (role != SUM), 0)] if kind == 'isolated' else \
        [(nonpad, n)]
    tiles = []
    for in_group, reach in groups:
        count = in_group.sum(1)                                                # (B,)
        n_tiles = -(-int(count.max()) // tile)
        if n_tiles == 0:
            continue
        order = torch.argsort((~in_group).to(torch.uint8), dim=1, stable=True)  # (B, T) group's rows first
        qi = F.pad(order, (0, max(0, n_tiles * tile - T)))[:, :n_tiles * tile]   # (B, tiles*tile)
        ok = torch.arange(n_tiles * tile, device=block.device) < count[:, None]  # (B, tiles*tile) real slots
        qi, ok = qi.view(B, n_tiles, tile), ok.view(B, n_tiles, tile)          # (B, tiles, tile)
        qb, qr = block.gather(1, qi.flatten(1)).view_as(qi), role.gather(1, qi.flatten(1)).view_as(qi)
        first = torch.searchsorted(mono, (qb - reach).flatten(1)).view_as(qi)  # (B, tiles, tile) oldest key
        lo = torch.where(ok, first, T).amin(dim=(0, 2))                        # (tiles,)
        hi = torch.where(ok, qi + 1, 0).amax(dim=(0, 2))                       # (tiles,)
        ki = lo[:, None] + torch.arange(int((hi - lo).max()), device=block.device)  # (tiles, K)
        in_range = ki < hi[:, None]                                            # (tiles, K)
        ki = ki.clamp(max=T - 1)
        allowed = allowed_pairs(qb, qr, qi, block[:, ki], role[:, ki], ki.expand(B, -1, -1), n, kind)
        allowed = (allowed & in_range[:, None, :]) | ~ok[..., None]  # filler rows see all, then are dropped
        mask = sdpa_mask(allowed, qi, ki, slopes)                              # (B, 1|nh, tiles, tile, K)
        mask = mask.expand(B, n_head, *mask.shape[2:]).reshape(B, n_head * n_tiles, tile, -1)
        tiles.append(Tiles(qi.flatten(1).contiguous(), ok.flatten(1), ki, mask))
    return tiles


def sparse_attention(q, k, v, tiles, dropout_p=0.0):
    """SDPA over sparse_tiles, one call per group: (B, nh, T, hs) like the dense call. Each
    group's rows are scattered back into place (filler slots into a spare row T, then dropped);
    PAD rows keep their value (they attend only themselves). index_select and gather, not advanced
    indexing, because their backwards (index_add, scatter_add) are several times faster on CPU."""
    B, nh, T, hs = q.shape
    y = F.pad(v, (0, 0, 0, 1))                                                 # (B, nh, T+1, hs)
    for g in tiles:
        n_tiles, K = g.keys.shape
        qt = q.gather(2, g.rows[:, None, :, None].expand(B, nh, -1, hs))        # (B, nh, tiles*tile, hs)
        qt = qt.view(B, nh * n_tiles, -1, hs)                                  # (B, nh*tiles, tile, hs)
        kt = k.index_select(2, g.keys.flatten()).view(B, nh * n_tiles, K, hs)  # (B, nh*tiles, K, hs)
        vt = v.index_select(2, g.keys.flatten()).view(B, nh * n_tiles, K, hs)  # (B, nh*tiles, K, hs)
        yt = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=g.mask, dropout_p=dropout_p)
        slots = torch.where(g.real, g.rows, T)[:, None, :, None].expand(B, nh, -1, hs)  # like qt, unsplit
        y = y.scatter(2, slots, yt.reshape(B, nh, -1, hs))                     # (B, nh, T+1, hs)
    return y[:, :, :T]                                                         # (B, nh, T, hs)


def flex_attention(q, k, v, block_mask, slopes=None, dropout_p=0.0):
    """FlexAttention (the CUDA path; tests/test_sparse.py::test_flex_equals_dense_in_eval_within_1e5):
    the masks' pair_rules as the BlockMask's mask_mod (built in GPT.attention_plan), ALiBi as a
    score_mod adding -slope_h * (q - k). Compiled into one fused kernel on CUDA; elsewhere the eager
    reference runs, which torch 2.13 supports for inference only. It has no dropout."""
    from torch.nn.attention import flex_attention as fa
    if dropout_p:
        raise ValueError('FlexAttention has no dropout')
    score_mod = None if slopes is None else (lambda score, b, h, qi, ki: score - slopes[h] * (qi - ki))
    run = compiled(fa.flex_attention) if q.device.type == 'cuda' else fa.flex_attention
    return run(q, k, v, score_mod=score_mod, block_mask=block_mask)            # (B, nh, T, hs)


compiled = cache(torch.compile)  # one compiled kernel per function and process

# -----------------------------------------------------------------------------
# analytic cost


def training_flops(config, block, role):
    """Analytic training FLOPs of one batch ((B, T) block and role) under `config`, the way
    nanoGPT's and nanochat's estimates count them: a forward layer costs 24*C^2 per token in its
    projections and MLP (qkv 6, output 2, MLP 16) and 4*C per query-key pair the mask allows (QK^T
    and AV); the read-out costs 2*C per token; backward = 2x forward, so training = 3x. Only real
    tokens count. Layer norms, softmax, embeddings and the optimizer are left out."""
    C, L = config.n_embd, config.n_layer
    real = role != PAD                                                         # (B, T)
    pairs = int((attention_mask(block, role, config.n, config.mask)[:, 0] & real[:, :, None]).sum())
    tokens = int(real.sum())                                                   # over the batch
    return 3 * (L * (24 * tokens * C * C + 4 * pairs * C) + 2 * tokens * C)

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

    def forward(self, x, attend):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)                     # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)        # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)        # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)        # (B, nh, T, hs)
        y = attend(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
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

    def forward(self, x, attend):
        x = x + self.attn(self.ln_1(x), attend)                                # (B, T, C)
        return x + self.mlp(self.ln_2(x))                                      # (B, T, C)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.mask in ('isolated', 'window') and config.pos in ('alibi', 'learned')
        assert config.attn in ('sparse', 'dense', 'flex')
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

    def slopes(self, device):
        """ALiBi's slopes in the model's float type, or None with learned positions."""
        dtype = self.transformer.wte.weight.dtype
        return alibi_slopes(self.config.n_head).to(device, dtype) if self.config.pos == 'alibi' else None

    def attention_plan(self, block, role):
        """Who sees whom in a batch ((B, T) block and role), worked out once for all layers: the
        dense SDPA mask, the sparse path's tiles, or FlexAttention's BlockMask (config.attn). It
        is the one part of a step whose shapes depend on the data, so the trainer builds it
        before the step, and the step itself has no data-dependent control flow."""
        cfg = self.config
        if cfg.attn == 'sparse':
            return sparse_tiles(block, role, cfg.n, cfg.mask, cfg.n_head, self.slopes(block.device), cfg.tile)
        if cfg.attn == 'flex':
            from torch.nn.attention.flex_attention import create_block_mask
            B, T = block.shape
            return create_block_mask(lambda b, h, q, k: pair_rules(block[b, q], role[b, q], q, block[b, k],
                                                                   role[b, k], k, cfg.n, cfg.mask),
                                     B, None, T, T, device=block.device)
        i = torch.arange(block.size(1), device=block.device).expand_as(block)  # (B, T)
        return sdpa_mask(attention_mask(block, role, cfg.n, cfg.mask)[:, 0], i, i, self.slopes(block.device))

    def forward(self, idx, block, role, plan=None):
        """(B, T) token ids, block indices and roles -> (B, T) CTR logits, meaningful at [SUM].
        `plan` is attention_plan(block, role), built here when not given. Attention is the dense
        reference (one SDPA call with attention_mask), its fast twin over sparse_tiles, or flex."""
        B, T = idx.size()
        cfg = self.config
        # one lookup for the tokens and the read-out rows <|yes|>, <|no|>: two lookups would build
        # the embedding's dense (vocab, C) gradient twice and add them, a fixed cost every step
        ids = torch.cat([idx.flatten(), idx.new_tensor([cfg.yes_id, cfg.no_id])])  # (B*T + 2,)
        emb = self.transformer.wte(ids)                                        # (B*T + 2, C)
        x, (yes, no) = emb[:-2].view(B, T, -1), emb[-2:]                       # (B, T, C), 2 x (C,)
        if cfg.pos == 'learned':
            if T > cfg.block_size:
                raise ValueError(f'prompt of {T} tokens is longer than block_size={cfg.block_size}')
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device))   # (B, T, C)
        x = self.transformer.drop(x)
        plan = self.attention_plan(block, role) if plan is None else plan
        # attend(q, k, v, dropout_p): the dense reference, its fast twin over tiles, or FlexAttention
        attend = (partial(F.scaled_dot_product_attention, attn_mask=plan) if cfg.attn == 'dense' else
                  partial(sparse_attention, tiles=plan) if cfg.attn == 'sparse' else
                  partial(flex_attention, block_mask=plan, slopes=self.slopes(x.device)))
        with sdpa_kernel(SDPA_BACKENDS):
            for layer in self.transformer.h:  # a transformer Block (GPT-2's name), not a block of tokens
                x = layer(x, attend)                                           # (B, T, C)
        x = self.transformer.ln_f(x)                                           # (B, T, C)
        # the LM head restricted to two rows: logit(yes) - logit(no), never the whole vocabulary
        return x @ (yes - no)                                                  # (B, T)

    def configure_optimizers(self, weight_decay, learning_rate, betas=(0.9, 0.999)):
        """AdamW grouped as nanoGPT does: weight decay on matrices and embeddings (every parameter of
        two or more dimensions), none on biases and layer norms (torch's default betas, not nanoGPT's
        beta2 0.95). Fused: one kernel a step."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
                  dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=True)


def ctr_loss(logits, label):
    """Binary cross-entropy over target [SUM] positions only (label >= 0)."""
    target = label >= 0                                                        # (B, T)
    return F.binary_cross_entropy_with_logits(logits[target], label[target].float())
