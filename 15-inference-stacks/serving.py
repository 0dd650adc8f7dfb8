"""The two ideas that make LLM serving engines fast, from scratch: a paged KV cache and continuous batching.

**Paged KV cache.** 06's cache reserves one contiguous buffer per request, sized for the longest the request
could get; most of it stays empty. A paged cache (vLLM's PagedAttention) cuts the keys/values into fixed-size
*blocks* of `block_size` token slots drawn from one shared pool. Each sequence owns a *block table* (the list of
its blocks, in order); token t of a sequence lives in block `table[t // block_size]` at offset `t % block_size`.
A sequence takes a new block only when its last one is full, and gives all of them back to the *free list*
when it finishes, so at most `block_size - 1` slots per sequence are ever empty.

**Continuous batching.** A static batch runs until its longest request is done; finished rows sit idle. A
continuous batcher (Orca's iteration-level scheduling) decides at *every step* which sequences run: finished
ones leave, waiting ones are admitted into the freed slots, and a newly admitted request's prompt (its
*prefill*) goes through the model in the same forward pass as the one-token *decode* rows of the others.
When the pool runs out of blocks, the newest running sequence is *preempted*: its blocks are freed and it
goes back to the head of the queue, to be recomputed (prompt + tokens so far) when blocks are free again.

The model is `shared.model.GPT` (RoPE, causal): its modules are reused and every attention's own `project`
gives the queries, keys and values at the sequence's absolute positions; only the cache bookkeeping is ours.

Shapes: N layers, K key/value heads, D head_dim, H query heads, C d_model, V vocab, T tokens of one sequence in
this step, L tokens stored for a sequence, S = num_blocks x block_size slots in the pool.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from shared.model import GPT, Attention, apply_rope, model_device, rope_table
from shared.validate import check_ints

__all__ = ["OutOfBlocksError", "PagedKVCache", "project_at", "forward_paged", "Request", "StepStats", "Engine", "mixed_workload",
           "reference_outputs"]

POLICIES = ("continuous", "static")


class OutOfBlocksError(RuntimeError):
    """The pool has no free block for a sequence that needs one (the scheduler preempts instead of raising)."""


# ---------------------------------------------------------------------------------------------- validators
def _check_model(model) -> None:
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a shared.model.GPT, got {type(model).__name__}")
    if model.cfg.pos != "rope" or not model.cfg.causal:
        raise ValueError(f"model must be a causal RoPE GPT, got pos={model.cfg.pos!r} causal={model.cfg.causal}")
    custom = [type(b.attn).__name__ for b in model.blocks if not isinstance(b.attn, Attention)]
    if custom:   # we call project/o_proj ourselves: a plug-in attention would be bypassed
        raise TypeError(f"model must use shared's Attention in every block, got {custom}")


# ---------------------------------------------------------------------------------------------- the cache
class PagedKVCache:
    """Keys and values of many sequences in one pool of fixed-size blocks.

    `k`, `v`: (N, num_blocks, block_size, K, D). `tables[seq]` is the sequence's block table (block ids in
    order) and `lengths[seq]` the tokens it has stored. `free` is the free list (a FIFO of block ids);
    `refcount[block]` counts the tables holding a block (more than one only when a prefix is shared).
    `reserve(seq, n)` takes the blocks needed to store n more tokens (raising `OutOfBlocksError`, with nothing
    taken, when the pool cannot); `write` / `read` store and gather one layer's keys/values through the table;
    `release(seq)` returns every block of a sequence to the free list. With `prefix_caching`, full blocks are
    also indexed by a hash of the whole prefix they end (`register_prefix`), and a new sequence starts on the
    blocks of its longest cached prefix (`match_prefix`) instead of recomputing them; a freed block keeps its
    hash until it is handed out again (so the least recently freed prefix is forgotten first).
    """

    def __init__(self, n_layer: int, n_kv_head: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", prefix_caching: bool = False):
        check_ints(1, n_layer=n_layer, n_kv_head=n_kv_head, head_dim=head_dim, num_blocks=num_blocks,
                    block_size=block_size)
        if not isinstance(prefix_caching, bool):
            raise TypeError(f"prefix_caching must be a bool, got {type(prefix_caching).__name__}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        shape = (n_layer, num_blocks, block_size, n_kv_head, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size, self.num_blocks = block_size, num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}
        self.refcount = [0] * num_blocks          # sequences whose table holds the block (> 1: a shared prefix)
        self.prefix_caching = prefix_caching
        self.cached: dict[int, int] = {}          # prefix hash -> block holding that full block of tokens
        self.hash_of: dict[int, int] = {}         # block -> its prefix hash (kept while the block is free)

    @classmethod
    def for_model(cls, model: GPT, num_blocks: int, block_size: int, prefix_caching: bool = False
                  ) -> "PagedKVCache":
        _check_model(model)
        cfg, w = model.cfg, model.tok_emb.weight
        return cls(cfg.n_layer, cfg.n_kv_head, cfg.head_dim, num_blocks, block_size, w.dtype, w.device,
                   prefix_caching)

    # -- bookkeeping -------------------------------------------------------------------------------------
    def blocks_for(self, n_tokens: int) -> int:
        """Blocks needed to hold n_tokens: ceil(n_tokens / block_size)."""
        return -(-n_tokens // self.block_size)

    def blocks_needed(self, seq: int, n_new: int) -> int:
        """Extra blocks `seq` needs to store n_new more tokens (0 while its last block has room)."""
        have = len(self.tables.get(seq, ()))
        return max(0, self.blocks_for(self.lengths.get(seq, 0) + n_new) - have)

    def reserve(self, seq: int, n_new: int) -> None:
        """Make room for n_new more tokens of `seq` (a new sequence gets an empty table first)."""
        check_ints(0, seq=seq, n_new=n_new)
        need = self.blocks_needed(seq, n_new)
        if need > len(self.free):
            raise OutOfBlocksError(f"sequence {seq} needs {need} more blocks, {len(self.free)} are free")
        table = self.tables.setdefault(seq, [])
        self.lengths.setdefault(seq, 0)
        for _ in range(need):
            block = self.free.popleft()                      # the least recently freed block
            if block in self.hash_of:                        # it held a cached prefix: that entry is gone now
                del self.cached[self.hash_of.pop(block)]
            self.refcount[block] = 1
            table.append(block)

    def release(self, seq: int) -> None:
        """Drop `seq`'s hold on its blocks and forget the sequence; a block no sequence holds any more goes back
        to the free list (with prefix caching it keeps its contents and its hash until it is handed out again)."""
        if seq not in self.tables:
            raise KeyError(f"sequence {seq} holds no blocks")
        for block in self.tables.pop(seq):
            self.refcount[block] -= 1
            if self.refcount[block] == 0:
                self.free.append(block)
        del self.lengths[seq]

    # -- prefix caching ----------------------------------------------------------------------------------
    def _prefix_hashes(self, tokens: list[int]) -> list[int]:
        """One hash per *full* block of `tokens`, each chained to the previous one: block i's hash names the
        whole prefix tokens[: (i + 1) * block_size], so equal hashes mean equal keys/values at equal positions."""
        hashes, h = [], 0
        for i in range(len(tokens) // self.block_size):
            h = hash((h, tuple(tokens[i * self.block_size:(i + 1) * self.block_size])))
            hashes.append(h)
        return hashes

    def match_prefix(self, seq: int, tokens: list[int]) -> int:
        """Start a new sequence on the cached blocks of its longest cached prefix; returns the tokens matched.

        Matches whole blocks only, and never the last token (its logits are needed, so it must be computed).
        Matched blocks are shared (refcount + 1) and never written again: the sequence writes only from the
        first unmatched position on, which starts a fresh block."""
        if seq in self.tables:
            raise ValueError(f"sequence {seq} already holds blocks: match_prefix starts a new sequence")
        table = self.tables.setdefault(seq, [])
        self.lengths[seq] = 0
        if not self.prefix_caching:
            return 0
        for h in self._prefix_hashes(tokens[:-1]):
            block = self.cached.get(h)
            if block is None:
                break
            if self.refcount[block] == 0:
                self.free.remove(block)                      # a cached free block comes back into use
            self.refcount[block] += 1
            table.append(block)
        self.lengths[seq] = len(table) * self.block_size
        return self.lengths[seq]

    def register_prefix(self, seq: int, tokens: list[int]) -> None:
        """Publish the full blocks of `seq` that hold `tokens` (its first len(tokens) tokens, already stored)
        so that later sequences with the same prefix can share them."""
        if not self.prefix_caching:
            return
        if len(tokens) > self.lengths[seq]:
            raise ValueError(f"sequence {seq} stores {self.lengths[seq]} tokens, cannot register {len(tokens)}")
        for h, block in zip(self._prefix_hashes(tokens), self.tables[seq]):
            if h not in self.cached and block not in self.hash_of:
                self.cached[h], self.hash_of[block] = block, h

    def slots(self, seq: int, start: int, n: int) -> torch.Tensor:
        """Flat pool slots (block * block_size + offset) of tokens start .. start + n - 1 of `seq`: (n,) long."""
        table = torch.tensor(self.tables[seq], dtype=torch.long, device=self.k.device)    # index the pool where it is
        pos = torch.arange(start, start + n, device=self.k.device)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    # -- data --------------------------------------------------------------------------------------------
    def write(self, layer: int, seq: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (K, T, D) of tokens start .. start + T - 1 of `seq` (room must have been reserved)."""
        T = k.shape[1]
        if start + T > len(self.tables[seq]) * self.block_size:
            raise OutOfBlocksError(f"sequence {seq}: tokens up to {start + T} not reserved "
                                   f"({len(self.tables[seq])} blocks of {self.block_size})")
        idx = self.slots(seq, start, T)
        self.k[layer].view(-1, *self.k.shape[3:])[idx] = k.transpose(0, 1)     # (T, K, D) into flat slots
        self.v[layer].view(-1, *self.v.shape[3:])[idx] = v.transpose(0, 1)

    def read(self, layer: int, seq: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of tokens 0 .. length - 1 of `seq`, gathered through its block table: (K, L, D) each."""
        idx = self.slots(seq, 0, length)
        k = self.k[layer].view(-1, *self.k.shape[3:])[idx]                       # (L, K, D)
        v = self.v[layer].view(-1, *self.v.shape[3:])[idx]
        return k.transpose(0, 1), v.transpose(0, 1)

    # -- accounting ----------------------------------------------------------------------------------------
    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def stored_tokens(self) -> int:
        return sum(self.lengths.values())

    @property
    def reserved_slots(self) -> int:
        """Slots owned by sequences (used blocks x block_size); reserved - stored = wasted slots."""
        return self.used_blocks * self.block_size


# ---------------------------------------------------------------------------------------------- the forward
def project_at(attn: Attention, x: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`Attention.project` for tokens at arbitrary absolute positions: x (1, T, C), positions (T,) long ->
    q (1, H, T, D), k, v (1, K, T, D), RoPE applied at each token's own position.

    `attn.project(x, start_pos)` assumes the T tokens are consecutive; a batch that packs several sequences
    end to end is not, so each row takes its rotation from the same RoPE table by its position.
    """
    cfg = attn.cfg
    _, T, _ = x.shape
    H, K, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    q = attn.q_proj(x).view(1, T, H, D).transpose(1, 2)                  # (1, H, T, D)
    k = attn.k_proj(x).view(1, T, K, D).transpose(1, 2)                  # (1, K, T, D)
    v = attn.v_proj(x).view(1, T, K, D).transpose(1, 2)
    cos, sin = rope_table(0, int(positions.max()) + 1, D, cfg.rope_theta, x.device, q.dtype)
    cos, sin = cos[positions], sin[positions]                            # (T, D): row t rotates by positions[t]
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def forward_paged(model: GPT, cache: PagedKVCache, seqs: list[int], chunks: list[torch.Tensor]) -> torch.Tensor:
    """One forward pass over several sequences at once; returns each sequence's last-position logits (n, V).

    chunks[i] (T_i,) are the new tokens of seqs[i]: a whole prompt (prefill, T_i >= 1) or one token (decode).
    All sum(T_i) tokens are packed end to end into one (1, sum T_i, C) batch, with no padding: embedding,
    projections (RoPE at each token's own position L_i + t), norms, MLP and LM head run once on the pack;
    only attention runs per sequence, each reading its keys/values through its block table.
    """
    if len(seqs) != len(chunks) or not seqs:
        raise ValueError(f"need one chunk per sequence and at least one, got {len(seqs)} seqs, {len(chunks)} chunks")
    cfg = model.cfg
    H, K, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    sizes = [int(c.numel()) for c in chunks]
    starts = [cache.lengths[s] for s in seqs]
    for s, L0, T in zip(seqs, starts, sizes):
        if L0 + T > len(cache.tables[s]) * cache.block_size:
            raise OutOfBlocksError(f"sequence {s}: room for {L0 + T} tokens was not reserved")
    dev = model_device(model)                                 # inputs go where the model is
    positions = torch.cat([torch.arange(L0, L0 + T, device=dev) for L0, T in zip(starts, sizes)])      # (sum T,)
    new_slots = torch.cat([cache.slots(s, L0, T) for s, L0, T in zip(seqs, starts, sizes)])  # where k, v go
    seen_slots = [cache.slots(s, 0, L0 + T) for s, L0, T in zip(seqs, starts, sizes)]      # what each reads
    masks = [None if T == 1 else   # query t sits at position L0 + t and may see keys 0 .. L0 + t
             torch.arange(L0 + T, device=dev)[None, :] <= torch.arange(L0, L0 + T, device=dev)[:, None]
             for L0, T in zip(starts, sizes)]
    x = model.tok_emb(torch.cat(chunks).view(1, -1).to(dev))                      # (1, sum T, C)
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        q, k, v = project_at(attn, block.norm1(x), positions)             # (1, H, sum T, D), (1, K, sum T, D)
        k_pool = cache.k[layer].view(-1, K, D)                             # (S, K, D): flat slots
        v_pool = cache.v[layer].view(-1, K, D)
        k_pool[new_slots] = k[0].transpose(0, 1)                           # (sum T, K, D) into their slots
        v_pool[new_slots] = v[0].transpose(0, 1)
        outs = []
        for q_i, seen, mask in zip(q.split(sizes, dim=2), seen_slots, masks):
            k_i = k_pool[seen].transpose(0, 1)[None]                       # (1, K, L, D) gathered via the table
            v_i = v_pool[seen].transpose(0, 1)[None]
            outs.append(F.scaled_dot_product_attention(q_i, k_i, v_i, attn_mask=mask, enable_gqa=K != H))
        y = torch.cat(outs, dim=2).transpose(1, 2).reshape(1, -1, H * D)  # (1, sum T, C)
        x = x + attn.o_proj(y)
        x = x + block.mlp(block.norm2(x))
    for s, T in zip(seqs, sizes):
        cache.lengths[s] += T
    last = torch.tensor(sizes, device=dev).cumsum(0) - 1                               # each sequence's last token
    return model.lm_head(model.norm(x[0, last]))                           # (n, V)


# ---------------------------------------------------------------------------------------------- the scheduler
@dataclass
class Request:
    """A generation request: greedy, exactly `max_new_tokens` new tokens (end-of-text is not a stop here, so
    every stack and every schedule produces the same number of tokens)."""
    rid: int
    prompt: list[int]
    max_new_tokens: int
    arrival: int = 0                       # engine step at which the request arrives
    output: list[int] = field(default_factory=list)
    admitted: int | None = None            # step of (last) admission
    first_token: int | None = None         # step that produced the first new token
    finished: int | None = None            # step that produced the last one
    preemptions: int = 0
    prefills: int = 0                      # times its context was run through the model (> 1: recomputed)
    cached_tokens: int = 0                 # context tokens found in the prefix cache at its (last) admission

    def __post_init__(self):
        check_ints(0, rid=self.rid, arrival=self.arrival)
        check_ints(1, max_new_tokens=self.max_new_tokens)
        if not isinstance(self.prompt, list) or not self.prompt or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in self.prompt):
            raise TypeError(f"prompt must be a non-empty list of int token ids, got {self.prompt!r}")

    @property
    def context(self) -> list[int]:
        return self.prompt + self.output

    @property
    def max_len(self) -> int:
        """Tokens the cache must hold at the end: prompt + all new tokens but the last (never fed back)."""
        return len(self.prompt) + self.max_new_tokens - 1


@dataclass
class StepStats:
    """What one engine step did (a row of the trace)."""
    step: int
    running: int              # sequences in this step's forward pass
    idle_slots: int           # batch slots with no work: max_batch - running (static: finished rows wait too)
    prefill_tokens: int       # prompt (or recomputed) tokens fed this step
    decode_tokens: int        # one per decoding sequence
    waiting: int              # requests arrived but not running
    finished: int             # requests done so far
    stored_tokens: int        # tokens held in the paged cache after the step
    paged_slots: int          # slots in blocks owned by sequences (used blocks x block_size)
    contiguous_slots: int     # slots a per-request contiguous cache sized for the longest request would hold
    preempted: int            # sequences preempted this step
    recomputed_tokens: int    # prefill tokens that were already computed once before a preemption
    prefix_hit_tokens: int    # prompt tokens of newly admitted sequences found in the prefix cache (not computed)
    cpu_s: float = 0.0        # process CPU seconds of the step (machine-dependent; everything else is not)


class Engine:
    """Continuous (or static) batching of greedy requests over a `PagedKVCache`.

    Every `step()`: (1) arrived requests join the waiting queue; (2) the scheduler admits waiting requests
    into free batch slots while the pool has blocks for their whole context (policy "continuous": at any step;
    "static": only when the previous batch has completely finished); (3) each running sequence reserves room
    for its next token, preempting the newest running sequence when the pool is out of blocks; (4) one
    `forward_paged` runs the prefills of newly admitted sequences and one decode token of every other one;
    (5) greedy tokens are appended, and finished requests release their blocks.

    With `prefix_caching`, an admitted request first takes the cached blocks of its longest prefix already in
    the pool (`PagedKVCache.match_prefix`, whole blocks, by chained hash) and prefills only the rest; its full
    blocks are published for later requests after its prefill (`register_prefix`).

    `contiguous_len` (default: the longest `max_len` of the requests added) sizes the per-request contiguous
    cache that the trace's `contiguous_slots` compares against.
    """

    def __init__(self, model: GPT, num_blocks: int, block_size: int = 8, max_batch: int = 8,
                 policy: str = "continuous", prefix_caching: bool = False):
        _check_model(model)
        check_ints(1, num_blocks=num_blocks, block_size=block_size, max_batch=max_batch)
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.model, self.policy, self.max_batch = model, policy, max_batch
        self.cache = PagedKVCache.for_model(model, num_blocks, block_size, prefix_caching)
        self.pending: list[Request] = []       # not arrived yet
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []       # admission order: the last is preempted first
        self.batch: list[Request] = []         # static policy: the current batch, finished rows included
        self.done: list[Request] = []
        self.trace: list[StepStats] = []
        self.step_no = 0
        self.contiguous_len = 0

    def add(self, request: Request) -> None:
        if not isinstance(request, Request):
            raise TypeError(f"request must be a Request, got {type(request).__name__}")
        if self.cache.blocks_for(request.max_len) > self.cache.num_blocks:
            raise ValueError(f"request {request.rid} needs {self.cache.blocks_for(request.max_len)} blocks at its "
                             f"longest, the pool has {self.cache.num_blocks}: it could never finish")
        if request.max_new_tokens + len(request.prompt) > self.model.cfg.block_size:
            raise ValueError(f"request {request.rid}: prompt + max_new_tokens = "
                             f"{len(request.prompt) + request.max_new_tokens} exceeds the model's context "
                             f"{self.model.cfg.block_size}")
        self.pending.append(request)
        self.contiguous_len = max(self.contiguous_len, request.max_len)

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.waiting or self.running)

    def _admit(self) -> list[Request]:
        if self.policy == "static" and self.running:
            return []
        admitted = []
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting[0]
            # blocks for its context now, plus one more token for each sequence already running whose last
            # block is full (else admitting it would force an immediate preemption)
            need = self.cache.blocks_for(len(req.context)) + sum(
                self.cache.blocks_needed(r.rid, 1) for r in self.running if r not in admitted)
            if need > len(self.cache.free):
                break
            self.waiting.popleft()
            req.cached_tokens = self.cache.match_prefix(req.rid, req.context)    # 0 without prefix caching
            self.cache.reserve(req.rid, len(req.context) - req.cached_tokens)
            req.admitted = self.step_no
            self.running.append(req)
            admitted.append(req)
        if self.policy == "static" and admitted:
            self.batch = list(admitted)
        return admitted

    def _preempt(self, victim: Request) -> None:
        self.cache.release(victim.rid)
        self.running.remove(victim)
        victim.preemptions += 1
        self.waiting.appendleft(victim)

    @torch.no_grad()
    def step(self) -> StepStats:
        """Run one scheduling step and one forward pass; returns (and records) its `StepStats`."""
        if not self.busy:
            raise RuntimeError("nothing to run: every request has finished")
        t0 = time.process_time()
        arrived = [r for r in self.pending if r.arrival <= self.step_no]
        self.pending = [r for r in self.pending if r.arrival > self.step_no]
        self.waiting.extend(sorted(arrived, key=lambda r: (r.arrival, r.rid)))
        new = self._admit()
        preempted = 0
        for req in [r for r in self.running if r not in new]:   # decode rows: room for one more token
            while req in self.running and self.cache.blocks_needed(req.rid, 1) > len(self.cache.free):
                victim = self.running[-1]                          # newest first (vLLM's recompute policy)
                self._preempt(victim)
                if victim in new:
                    new.remove(victim)
                preempted += 1
            if req in self.running:
                self.cache.reserve(req.rid, 1)
        seqs, chunks = [], []
        prefill = recomputed = hits = 0
        for req in self.running:
            if req in new:
                tokens = req.context[req.cached_tokens:]   # what the prefix cache did not already hold
                prefill += len(tokens)
                hits += req.cached_tokens
                if req.prefills:                   # it ran before a preemption: this is computed again
                    recomputed += len(tokens)
                req.prefills += 1
            else:
                tokens = req.output[-1:]
            seqs.append(req.rid)
            chunks.append(torch.tensor(tokens, dtype=torch.long))
        n_running = len(seqs)
        rows = len(self.batch) if self.policy == "static" else n_running   # rows holding a contiguous cache
        if seqs:
            logits = forward_paged(self.model, self.cache, seqs, chunks)
            for req in new:
                self.cache.register_prefix(req.rid, req.context)
            for req, nxt in zip(list(self.running), logits.argmax(dim=-1).cpu().tolist()):
                if req.first_token is None:
                    req.first_token = self.step_no
                req.output.append(nxt)
                if len(req.output) == req.max_new_tokens:
                    req.finished = self.step_no
                    self.cache.release(req.rid)
                    self.running.remove(req)
                    self.done.append(req)
        if self.policy == "static" and not self.running:
            self.batch = []
        stats = StepStats(
            step=self.step_no, running=n_running, idle_slots=self.max_batch - n_running,
            prefill_tokens=prefill, decode_tokens=n_running - len(new), waiting=len(self.waiting),
            finished=len(self.done), stored_tokens=self.cache.stored_tokens, paged_slots=self.cache.reserved_slots,
            contiguous_slots=rows * self.contiguous_len, preempted=preempted, recomputed_tokens=recomputed,
            prefix_hit_tokens=hits, cpu_s=time.process_time() - t0)
        self.trace.append(stats)
        self.step_no += 1
        return stats

    def run(self, requests: list[Request] | None = None, max_steps: int = 100_000) -> list[Request]:
        """Add `requests`, step until all have finished; returns them ordered by rid."""
        for r in requests or []:
            self.add(r)
        while self.busy:
            if self.step_no >= max_steps:
                raise RuntimeError(f"not finished after {max_steps} steps")
            self.step()
        return sorted(self.done, key=lambda r: r.rid)


# ---------------------------------------------------------------------------------------------- workloads
def mixed_workload(prompts: list[list[int]], new_tokens: list[int], arrivals: list[int] | None = None
                   ) -> list[Request]:
    """Fresh `Request`s (rid = index) from prompts, per-request new-token counts and optional arrival steps."""
    if len(prompts) != len(new_tokens) or (arrivals is not None and len(arrivals) != len(prompts)):
        raise ValueError(f"prompts ({len(prompts)}), new_tokens ({len(new_tokens)}) and arrivals "
                         f"({None if arrivals is None else len(arrivals)}) must have the same length")
    arrivals = arrivals or [0] * len(prompts)
    return [Request(i, list(p), n, a) for i, (p, n, a) in enumerate(zip(prompts, new_tokens, arrivals))]


@torch.no_grad()
def reference_outputs(model: GPT, requests: list[Request]) -> list[list[int]]:
    """Each request decoded on its own with the shared loop (`shared.model.decode`, greedy, its own KV cache):
    the new tokens, the reference every batched schedule must reproduce."""
    from shared.model import decode, greedy_next

    out = []
    for r in requests:
        ids = decode(model, torch.tensor([r.prompt], device=model_device(model)), r.max_new_tokens,
                     greedy_next)
        out.append(ids[0, len(r.prompt):].cpu().tolist())
    return out
