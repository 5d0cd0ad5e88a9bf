"""The rollout loop: a fixed set of slots over the latent cache, refilled as sequences finish.

Every sequence (prompt p, sample j) occupies one slot. Admission writes the prompt's first L-1
tokens into the slot's cache rows - by a packed prefill for the first sample of a prompt, by a
copy of those rows from a live sibling slot for the others (n samples share one prefill) - and
puts the last prompt token in as the slot's next decode input; so every completion token,
the first included, is chosen by the same decode step. The decode step runs all slots with
static shapes (finished and empty slots ride along, masked), keeps its counters, outputs and
stop flags on the device, and never reads back to the host. Every `refill_every` steps the host
reads the finished flags once, collects finished rows and refills their slots from the queue
(continuous batching): a finished row idles at most refill_every - 1 steps.

Once the queue is empty the batch can only thin (the straggler tail of variable-length completions).
Then, at a refill point, the live rows are compacted into the lowest slots (their cache rows and
state moved, `compact_rows`) and the step runs over the first `width` slots only, width shrinking by
halves (`widths`): the tail's steps cost what their live rows need, not the full batch. Compaction
moves rows without touching what they compute, so completions are unchanged in distribution.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
from torch import nn

from align.generation.cache import CacheError, LatentCache
from align.generation.fold import DecodeWeights
from align.generation.forward import decode_logits, prefill, unwrap
from align.generation.graphs import GraphRunner, model_signature
from align.generation.requests import Completion, Request, build_request
from align.generation.routing import RoutingRecorder
from align.generation.sampling import SamplingParams, choose, keyed_noise, sequence_key, vocab_hashes
from align.kernels.dispatch import triton_enabled
from align.kernels.grouped_mm import grouped_linear_sync_free
from align.models.config import moe_layers
from align.models.moe import RoutingTrace

STOP_PAD = 8  # stop-id tensor length is a multiple of this, so its shape (a graph key) rarely changes


@dataclass
class DecodeState:
    """Per-slot device tensors the decode step reads and updates in place."""

    tokens: torch.Tensor  # [slots] next input token
    positions: torch.Tensor  # [slots] where that token goes in the cache
    counts: torch.Tensor  # [slots] tokens generated so far
    done: torch.Tensor  # [slots] finished or empty
    out_tokens: torch.Tensor  # [slots, max_new]
    out_logprobs: torch.Tensor  # [slots, max_new] float32
    keys: torch.Tensor  # [slots] the noise key of each slot's sequence (sampling.sequence_key)
    vocab_hash: torch.Tensor  # [V] sampling.vocab_hashes
    stop_ids: torch.Tensor  # [STOP_PAD * k] padded with -1
    rows: torch.Tensor  # [slots] arange

    SHARED = ("stop_ids", "vocab_hash")  # fields not indexed by slot; every other field is [slots, ...]

    @classmethod
    def allocate(cls, slots: int, max_new: int, vocab: int, stops: int, device) -> DecodeState:
        long = {"dtype": torch.long, "device": device}
        return cls(
            tokens=torch.zeros(slots, **long), positions=torch.zeros(slots, **long),
            counts=torch.zeros(slots, **long), done=torch.ones(slots, dtype=torch.bool, device=device),
            out_tokens=torch.zeros(slots, max_new, **long),
            out_logprobs=torch.zeros(slots, max_new, dtype=torch.float32, device=device),
            keys=torch.zeros(slots, **long), vocab_hash=vocab_hashes(vocab, device),
            stop_ids=torch.full((stops,), -1, **long), rows=torch.arange(slots, **long),
        )

    def shape_key(self) -> tuple[int, int, int]:
        return self.tokens.shape[0], self.out_tokens.shape[1], self.stop_ids.shape[0]

    def per_slot(self) -> list[str]:
        return [f.name for f in fields(self) if f.name not in self.SHARED]

    def view(self, width: int) -> DecodeState:
        """The first `width` slots (views: a step over them updates this state in place)."""
        if width == self.tokens.shape[0]:
            return self
        per_slot = set(self.per_slot())
        return DecodeState(**{f.name: getattr(self, f.name)[:width] if f.name in per_slot else getattr(self, f.name)
                              for f in fields(self)})

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Slot src[i]'s state into slot dst[i] (every per-slot field); src slots are left done."""
        for name in self.per_slot():
            if name != "rows":  # rows is the identity
                tensor = getattr(self, name)
                tensor[dst] = tensor[src]
        self.done[src] = True


class GenerationEngine:
    """Holds the cache, the decode buffers and captured graphs between calls (keep one per trainer).

    max_batch: slots decoded together. max_len: cache positions per slot (default: what each call
    needs, rounded up to attend_bucket). refill_every: decode steps between host checks for finished
    rows. prefill_tokens: packed prompt tokens per prefill pass. cuda_graphs: capture the decode step
    (default: on where the MoE step is sync-free, i.e. bf16 on Hopper). attend_bucket: the attention
    length a graph covers is rounded up to a multiple of this, so graphs are few while attention
    reads about as many rows as are live. compile: torch.compile the decode step (then captured).
    fold: run live LoRA adapters as folded weights W + ΔW, computed once per call (align/generation/
    fold.py; default: on CUDA, where it removes the adapters' per-step cost; off on CPU, where the
    default keeps the unfolded numerics); fold_experts: fold routed-expert adapters too (a copy of the
    stacked experts, made only when the device has room for it). compact: once no sequence is queued,
    run the decode step over the live rows only, compacted into the lowest slots (default: on CUDA; off
    on CPU, where the default keeps the tiny recipes' recorded numerics).
    """

    def __init__(
        self, model: nn.Module, *, max_batch: int = 256, max_len: int | None = None, refill_every: int = 8,
        prefill_tokens: int = 4096, cuda_graphs: bool | None = None, attend_bucket: int = 128,
        compile: bool = False, fold: bool | None = None, fold_experts: bool = True, compact: bool | None = None,
    ):
        for name, value in (("max_batch", max_batch), ("refill_every", refill_every),
                            ("prefill_tokens", prefill_tokens), ("attend_bucket", attend_bucket)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be an integer >= 1")
        if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
            raise ValueError(f"max_len={max_len!r}: must be an integer >= 1 or None")
        self.model, self.lm = model, unwrap(model)
        weight = self.lm.lm_head.weight
        self.device, self.dtype = weight.device, self.lm.model.embed_tokens.weight.dtype
        self.max_batch, self.max_len, self.refill_every = max_batch, max_len, refill_every
        self.prefill_tokens, self.attend_bucket = prefill_tokens, attend_bucket
        # by default only where the MoE step is sync-free (grouped GEMM); a failed capture can leave
        # the CUDA RNG in capture mode, so it is not attempted where it is known to fail
        capturable = grouped_linear_sync_free(self.device, self.dtype)
        self.use_graphs = capturable if cuda_graphs is None else bool(cuda_graphs)
        # torch.compile fuses the step's elementwise work (norms, rope, casts) into fewer kernels
        self.decode = torch.compile(decode_logits, dynamic=False) if compile else decode_logits
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self.cache: LatentCache | None = None
        self.state: DecodeState | None = None
        self.graphs: GraphRunner | None = None
        self.recorder: RoutingRecorder | None = None  # routing buffers, allocated by a call that records
        self.recording = False
        self.fold = self.device.type == "cuda" if fold is None else bool(fold)
        self.folded = DecodeWeights(experts=fold_experts)  # decode-side W + ΔW buffers, kept between calls
        self.compact = self.device.type == "cuda" if compact is None else bool(compact)
        self.width = max_batch  # slots the decode step runs over (the first ones), set per call

    # ----------------------------------------------------------------------------- public
    def generate(
        self, prompt_token_ids, *, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
        top_k: int = 0, n: int = 1, eos_token_id: int | list[int] | None = None, stop_token_ids=(),
        seed: int | None = None, record_routing: bool = False, prompt_keys: Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """Per prompt, n completions (see align.generation.generate for the arguments). record_routing:
        each Completion also carries the experts its tokens were routed to (align.generation.routing).
        prompt_keys: an integer per prompt (default its index) keying its samples' noise with the seed and
        sample index, so a prompt's completions do not depend on the batch it came in."""
        request = build_request(
            prompt_token_ids, self.lm.config.vocab_size, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, n=n, eos_token_id=eos_token_id,
            stop_token_ids=stop_token_ids, seed=seed,
        )
        with self._adapters_folded():  # before _prepare: the graphs' signature sees the folded weights
            self._prepare(request, record_routing)
            modes = [(module, module.training) for module in self.model.modules()]
            self.model.eval()  # no dropout, no balance loss; each module's own mode is restored after
            try:
                with torch.no_grad():
                    return _Run(self, request, prompt_keys).loop()
            finally:
                for module, training in modes:
                    module.training = training

    @contextmanager
    def _adapters_folded(self):
        """Live LoRA adapters as folded weights for this call (align/generation/fold.py), when on."""
        if not self.fold:
            yield
            return
        with self.folded.applied(self.model):
            yield

    def release(self) -> None:
        """Free the cache, decode buffers and graphs (e.g. before a training step)."""
        self.cache = self.state = self.graphs = self.recorder = None
        self.folded.clear()

    def cache_bytes_per_token(self) -> int:
        config = self.lm.config
        element = torch.empty(0, dtype=self.dtype).element_size()
        return config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * element

    # ----------------------------------------------------------------------------- buffers
    def _prepare(self, request: Request, record_routing: bool = False) -> None:
        need = request.cache_len()
        if self.max_len is not None and need > self.max_len:
            longest = max(range(len(request.prompts)), key=lambda i: len(request.prompts[i]))
            raise CacheError(
                f"prompt_token_ids[{longest}] has {len(request.prompts[longest])} tokens; with "
                f"max_new_tokens={request.max_new_tokens} it needs {need} cache positions but the cache "
                f"holds max_len={self.max_len}: shorten the prompt, lower max_new_tokens or raise max_len"
            )
        slots = min(self.max_batch, request.sequences)
        max_len = self.max_len or -(-need // self.attend_bucket) * self.attend_bucket
        if self.cache is None or self.cache.slots != slots or self.cache.max_len < need:
            self.cache = None  # free before allocating the new one
            self.cache = LatentCache.for_model(self.lm.config, slots, max_len, self.dtype, self.device)
            self.graphs = None
        stops = max(1, -(-len(request.stop_ids) // STOP_PAD)) * STOP_PAD
        shape = (slots, request.max_new_tokens, stops)
        if self.state is None or self.state.shape_key() != shape:
            self.state = None
            self.state = DecodeState.allocate(*shape[:2], self.lm.config.vocab_size, stops, self.device)
            self.graphs = None
        self._prepare_recorder(record_routing, slots, request.max_new_tokens)
        if self.graphs is not None and not self.graphs.enabled:
            self.use_graphs = False  # a capture failed on this model: stay eager
        signature = (model_signature(self.model), triton_enabled()) if self.use_graphs else None
        if self.graphs is not None and self.graphs.signature != signature:
            self.graphs = None  # weights moved or adapters toggled since capture
        if self.graphs is None:
            st = self.state
            self.graphs = GraphRunner(self.use_graphs, [st.tokens, st.positions, st.counts, st.done], signature)
        self.state.stop_ids.fill_(-1)
        if request.stop_ids:
            self.state.stop_ids[: len(request.stop_ids)] = torch.tensor(request.stop_ids, device=self.device)
        self.state.done.fill_(True)
        self.width = slots

    def _prepare_recorder(self, record: bool, slots: int, max_new: int) -> None:
        """Routing buffers for a recording call (kept between calls; a new shape drops the graphs)."""
        self.recording = record and bool(moe_layers(self.lm.config))
        if not self.recording:
            return
        if self.recorder is None or self.recorder.decoded.shape[1:3] != (slots, max_new):
            self.recorder = None
            self.recorder = RoutingRecorder(self.lm.config, slots, max_new, self.device)
            self.graphs = None
        self.recorder.prompts = {}

    # ----------------------------------------------------------------------------- the step
    def step(
        self, attend_len: int, sampling: SamplingParams, max_new: int, record: bool = False, width: int | None = None
    ) -> None:
        """One decode step over the first `width` slots (default all): static shapes, device-only updates."""
        st = self.state.view(width or self.state.tokens.shape[0])
        trace = RoutingTrace() if record else None
        logits = self.decode(self.lm, self.cache, st.tokens, st.positions, attend_len, trace)  # [B, V]
        # noise keyed by (sequence, token index), drawn in the step (so in its graph): no generator
        noise = None if sampling.greedy else keyed_noise(st.keys, st.counts, st.vocab_hash)
        token, logprob = choose(logits, sampling, noise)
        running = ~st.done  # [B]
        col = st.counts.clamp(max=max_new - 1)
        if record:
            self.recorder.record_decode(trace, running, st.rows, col)
        st.out_tokens[st.rows, col] = torch.where(running, token, st.out_tokens[st.rows, col])
        st.out_logprobs[st.rows, col] = torch.where(running, logprob, st.out_logprobs[st.rows, col])
        st.counts += running
        stop = (token[:, None] == st.stop_ids[None]).any(-1) | (st.counts >= max_new)
        finished = running & stop
        st.done |= finished
        st.tokens.copy_(torch.where(running, token, st.tokens))
        st.positions += (running & ~finished).long()

    def run_step(self, attend_len: int, sampling: SamplingParams, max_new: int) -> None:
        width = self.width
        record = self.recording
        self.graphs.run(
            (attend_len, sampling, max_new, record, width),
            lambda: self.step(attend_len, sampling, max_new, record, width),
        )

    # ----------------------------------------------------------------------------- compaction
    def widths(self) -> list[int]:
        """Step widths, largest first: all slots, then halves rounded up to a multiple of 8 (few graphs)."""
        slots, out = self.state.tokens.shape[0], []
        width = slots
        while True:
            out.append(width)
            smaller = -(-(width // 2) // 8) * 8
            if width <= 8 or smaller >= width:
                return out
            width = smaller

    def compact_rows(self, src: list[int], dst: list[int], length: int) -> None:
        """Move slots src[i] into free slots dst[i]: cache positions [0, length), decode state, routing."""
        if not src:
            return
        source = torch.tensor(src, device=self.device)
        target = torch.tensor(dst, device=self.device)
        self.cache.copy_prefix(source, target, length)
        self.state.move(source, target)
        if self.recording:
            self.recorder.decoded[:, target] = self.recorder.decoded[:, source]


class _Run:
    """Host-side bookkeeping of one generate call: the queue, slot owners, collected results."""

    def __init__(self, engine: GenerationEngine, request: Request, prompt_keys: Sequence[int] | None = None):
        self.engine, self.request = engine, request
        self.queue = deque(range(request.sequences))  # sequence s = prompt s // n, sample s % n
        slots = engine.cache.slots
        self.owner: list[int | None] = [None] * slots
        self.start = [0] * slots  # step at which the slot's sequence was admitted
        self.results: list[list[Completion | None]] = [[None] * request.n for _ in request.prompts]
        self.step = 0
        keys = range(len(request.prompts)) if prompt_keys is None else list(prompt_keys)
        if len(keys) != len(request.prompts) or not all(isinstance(k, int) for k in keys):
            raise ValueError(f"prompt_keys: expected {len(request.prompts)} integers (one per prompt)")
        seed = secrets.randbits(63) if request.seed is None else request.seed
        self.keys = [sequence_key(seed, keys[s // request.n], s % request.n) for s in range(request.sequences)]

    def prompt(self, sequence: int) -> list[int]:
        return self.request.prompts[sequence // self.request.n]

    def loop(self) -> list[list[Completion]]:
        while True:
            self.collect_finished()
            self.admit()
            live = [s for s, owner in enumerate(self.owner) if owner is not None]
            if not live:
                return self.results
            live = self.compact(live)
            max_new = self.request.max_new_tokens
            left = max(max_new - (self.step - self.start[s]) for s in live)  # a row stops by max_new
            for _ in range(min(self.engine.refill_every, left)):
                self.engine.run_step(self.attend_len(live), self.request.sampling, max_new)
                self.step += 1

    def compact(self, live: list[int]) -> list[int]:
        """Once nothing is queued: narrow the step to the smallest width holding the live rows, moving
        those above it into free slots below it. Returns the live slots."""
        engine = self.engine
        if not engine.compact or self.queue:
            return live
        width = min(w for w in engine.widths() if w >= len(live))
        if width >= engine.width:
            return live
        free = [s for s in range(width) if self.owner[s] is None]
        src = [s for s in live if s >= width]
        dst = free[: len(src)]
        engine.compact_rows(src, dst, self.attend_len(live))
        for a, b in zip(src, dst, strict=True):
            self.owner[b], self.start[b], self.owner[a] = self.owner[a], self.start[a], None
        engine.width = width
        return sorted(s for s, owner in enumerate(self.owner) if owner is not None)

    def attend_len(self, live: list[int]) -> int:
        """A bound on every live row's position + 1, rounded up to the bucket (no host read)."""
        cap = self.request.max_new_tokens - 1
        last = max(len(self.prompt(self.owner[s])) - 1 + min(self.step - self.start[s], cap) for s in live)
        bucket = self.engine.attend_bucket
        return min(-(-(last + 1) // bucket) * bucket, self.engine.cache.max_len)

    def collect_finished(self) -> None:
        st = self.engine.state
        flags = torch.stack([st.done.long(), st.counts]).cpu()  # the one host read per refill
        finished, counts = flags.tolist()
        done = [s for s, owner in enumerate(self.owner) if owner is not None and finished[s]]
        if not done:
            return
        index = torch.tensor(done, device=st.tokens.device)
        tokens, logprobs = st.out_tokens[index].cpu(), st.out_logprobs[index].cpu()
        recorder = self.engine.recorder if self.engine.recording else None
        decoded = None if recorder is None else recorder.decoded[:, index]  # [M, done, max_new, k]
        stop_ids = set(self.request.stop_ids)
        for row, slot in enumerate(done):
            count = counts[slot]
            ids = tokens[row, :count].tolist()
            reason = "stop" if ids and ids[-1] in stop_ids else "length"
            sequence = self.owner[slot]
            prompt = sequence // self.request.n
            routing = None
            if recorder is not None:
                routing = recorder.completion(prompt, len(self.request.prompts[prompt]), decoded[:, row], count)
            self.results[prompt][sequence % self.request.n] = Completion(
                ids, logprobs[row, :count].tolist(), reason, routing
            )
            self.owner[slot] = None

    def admit(self) -> None:
        free = [s for s, owner in enumerate(self.owner) if owner is None]
        admitted = []
        while free and self.queue:
            admitted.append((free.pop(0), self.queue.popleft()))
        if not admitted:
            return
        n = self.request.n
        source = {self.owner[s] // n: s for s, o in enumerate(self.owner) if o is not None}  # live sibling
        to_prefill, copies = [], []
        for slot, sequence in admitted:
            prompt = sequence // n
            if prompt in source:
                copies.append((source[prompt], slot, len(self.prompt(sequence)) - 1))
            else:
                source[prompt] = slot
                to_prefill.append((slot, self.prompt(sequence)[:-1]))
            self.owner[slot], self.start[slot] = sequence, self.step
        self.prefill(to_prefill)
        groups: dict[tuple[int, int], list[int]] = {}
        for src, dst, length in copies:
            groups.setdefault((src, length), []).append(dst)
        device = self.engine.device
        for (src, length), dsts in groups.items():
            dst = torch.tensor(dsts, device=device)
            self.engine.cache.copy_prefix(torch.full_like(dst, src), dst, length)
        self.reset_slots(admitted)

    def prefill(self, prompts: list[tuple[int, list[int]]]) -> None:
        """Packed prefill of (slot, tokens) pairs, in passes of about engine.prefill_tokens tokens."""
        chunk, size = [], 0
        for slot, ids in [p for p in prompts if p[1]]:
            if chunk and size + len(ids) > self.engine.prefill_tokens:
                self._prefill_chunk(chunk)
                chunk, size = [], 0
            chunk.append((slot, ids))
            size += len(ids)
        if chunk:
            self._prefill_chunk(chunk)

    def _prefill_chunk(self, chunk: list[tuple[int, list[int]]]) -> None:
        ids = [t for _, p in chunk for t in p]
        positions = [i for _, p in chunk for i in range(len(p))]
        slots = [s for s, p in chunk for _ in p]
        device = self.engine.device
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)
        trace = RoutingTrace() if self.engine.recording else None
        prefill(
            self.engine.lm, self.engine.cache, as_tensor(ids), as_tensor(positions), as_tensor(slots), len(chunk),
            trace,
        )
        if trace is not None:
            prompts = [self.owner[s] // self.request.n for s, _ in chunk]
            self.engine.recorder.record_prefill(trace, prompts, [len(p) for _, p in chunk], device)

    def reset_slots(self, admitted: list[tuple[int, int]]) -> None:
        st, device = self.engine.state, self.engine.device
        slots = torch.tensor([s for s, _ in admitted], device=device)
        last = torch.tensor([self.prompt(q)[-1] for _, q in admitted], device=device)
        start = torch.tensor([len(self.prompt(q)) - 1 for _, q in admitted], device=device)
        st.tokens[slots] = last
        st.positions[slots] = start
        st.counts[slots] = 0
        st.done[slots] = False
        st.keys[slots] = torch.tensor([self.keys[q] for _, q in admitted], device=device)


def generate(
    model: nn.Module, prompt_token_ids, *, max_new_tokens: int, temperature: float = 1.0,
    top_p: float = 1.0, top_k: int = 0, n: int = 1, eos_token_id: int | list[int] | None = None,
    stop_token_ids=(), seed: int | None = None, max_batch: int = 256, max_len: int | None = None,
    refill_every: int = 8, cuda_graphs: bool | None = None,
) -> list[list[Completion]]:
    """Sample `n` completions for each prompt with `model` (ours, or PEFT-wrapped: adapters are live).

    prompt_token_ids: list of token-id lists (ragged). temperature 0 = greedy; top_k 0 and top_p 1
    disable those truncations. A row stops after max_new_tokens, or on eos_token_id (an id or a
    list; None = never) or any of stop_token_ids; the stop token is kept in the completion. seed
    makes the call reproducible (same inputs, settings and device -> same tokens).
    Returns, per prompt, n `Completion`s with .token_ids, .logprobs (log_softmax(logits /
    temperature) at each chosen token; plain log_softmax when greedy) and .finish_reason.
    For repeated calls (RL rollouts) keep a GenerationEngine, so buffers and CUDA graphs are reused.
    """
    engine = GenerationEngine(
        model, max_batch=max_batch, max_len=max_len, refill_every=refill_every, cuda_graphs=cuda_graphs
    )
    return engine.generate(
        prompt_token_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        n=n, eos_token_id=eos_token_id, stop_token_ids=stop_token_ids, seed=seed,
    )
