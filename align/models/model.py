"""DeepSeek-V2 / V3 decoder as a transformers PreTrainedModel (so PEFT, accelerate and TRL accept it).

Parameter names follow transformers' own DeepSeek-V2 implementation (routed experts stacked as
`mlp.experts.gate_up_proj` / `mlp.experts.down_proj`); align/models/checkpoint.py converts to and
from the per-expert hub layout on disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DeepseekV2Config, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from align.kernels.linear_logprob import linear_cross_entropy
from align.models.checkpoint import load_model, save_model
from align.models.config import is_moe_layer
from align.models.layout import attention_layout
from align.models.mla import MLA
from align.models.moe import MLP, Experts, Gate, MoE, RoutingTrace
from align.models.norm import RMSNorm
from align.models.rope import RotaryEmbedding


def keep_positions(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """0 keeps all positions, an int n the last n, a tensor the listed indices. [B, S, H] -> [B, S', H]."""
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
    return hidden[:, logits_to_keep]


# transformers 5.24 renamed the outputs' `past_key_values` field to `cache` (the old name stays a read-only
# alias); outputs are built with whichever name the installed version declares.
CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class CausalLMOutput(MoeCausalLMOutputWithPast):
    """transformers' MoE causal-LM output plus the final hidden states (TRL's fused LM head reads them)."""

    last_hidden_state: torch.Tensor | None = None


@dataclass
class BackboneOutput(MoeModelOutputWithPast):
    """DeepseekV2Model's output: `last_hidden_state` (after the final norm) and the summed balance loss."""

    aux_loss: torch.Tensor | None = None


def pick_cache(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    """The cache under either name (`cache` since transformers 5.24, `past_key_values` before)."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


class DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = MLA(config, layer_idx)
        self.is_moe = is_moe_layer(config, layer_idx)
        self.mlp = MoE(config, layer_idx) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, token_mask=None, cache=None, routing=None):
        """x [B, S, H] -> (x + attention + feed-forward [B, S, H], balance loss or None)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        h, aux = self.feed_forward(self.post_attention_layernorm(x), token_mask, routing)
        return x + h, aux

    def feed_forward(self, h, token_mask=None, routing=None):
        """Normalised h [B, S, H] -> (MoE or dense MLP output [B, S, H], balance loss or None)."""
        if self.is_moe:
            return self.mlp(h, token_mask, routing)
        return self.mlp(h), None

    def write_latents(self, x, cos, sin, cache) -> None:
        """Hand this layer's latents for x to `cache.update` without computing the layer's output."""
        self.self_attn.write_latents(self.input_layernorm(x), cos, sin, cache)

    def decode(self, x, delta, cos, sin, rows, positions, attend_len, routing=None):
        """One token per cache slot: the residual stream x [B, 1, H] still lacking `delta` (the previous
        layer's feed-forward output, or None) -> (x, this layer's feed-forward output) for the next
        layer, so each residual add fuses with the norm after it. rows: this layer's latent cache
        (MLA.decode). routing: a RoutingTrace recording the MoE routing."""
        x, h = self.input_layernorm.add(x, delta)
        attn = self.self_attn.decode(h, cos, sin, rows, positions, attend_len)
        x, h = self.post_attention_layernorm.add(x, attn)
        return x, self.feed_forward(h, None, routing)[0]


class DeepseekV2PreTrainedModel(PreTrainedModel):
    config_class = DeepseekV2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, Gate):
            module.weight.normal_(0.0, std)
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.zero_()
        elif isinstance(module, Experts):
            module.gate_up_proj.normal_(0.0, std)
            module.down_proj.normal_(0.0, std)

    def reset_parameters(self, seed: int | None = None) -> None:
        """Random initialisation of every weight in place (used after building on the meta device)."""
        if seed is not None:
            torch.manual_seed(seed)
        for module in self.modules():
            self._init_weights(module)


class DeepseekV2Model(DeepseekV2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        cache: Cache | None = None,
        routing: RoutingTrace | None = None,
        token_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> BackboneOutput:
        """-> (final hidden states [B, S, H] after the last norm, summed balance loss or None).

        position_ids restarting inside a row mark packed documents: attention stays within each.
        attention_mask [B, past+S] marks padding keys (1 = real token). past_key_values: a transformers
        Cache of MLA latents (GenerationMixin.generate); the fast rollout path is align.generation.
        routing: a RoutingTrace recording each MoE layer's routing and forcing replayed expert ids.
        token_mask [B, S]: the tokens the balance loss counts (default: attention_mask's real tokens),
        for right-padded rows that need no attention mask.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        past_key_values = pick_cache(past_key_values, cache)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq = x.shape[:2]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        mask = attention_layout(x, position_ids, attention_mask, past)
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=x.device).expand(batch, seq)  # [B, S]
        if token_mask is None and attention_mask is not None:
            token_mask = attention_mask[:, past:]
        cos, sin = self.rotary_emb(position_ids)
        aux_total = None
        for layer in self.layers:
            x, aux = layer(x, cos, sin, mask, token_mask, past_key_values, routing)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        return BackboneOutput(last_hidden_state=self.norm(x), aux_loss=aux_total, **{CACHE_FIELD: past_key_values})

    def fill_cache(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None, cache,
        routing: RoutingTrace | None = None,
    ) -> None:
        """Prefill: run the layers as far as `cache` needs. Every layer hands its latents [B, 1, S, d]
        to cache.update(c, k_pe, layer_idx), which returns the latents to attend over; the last
        layer's output feeds nothing the cache needs, so it is not computed (nor, then, its routing).
        ids/positions [B, S], mask as from align.models.layout.attention_layout (None = causal); routing:
        a RoutingTrace."""
        cos, sin = self.rotary_emb(position_ids)
        x = self.embed_tokens(input_ids)  # [B, S, H]
        for layer in self.layers[:-1]:
            x, _ = layer(x, cos, sin, mask, None, cache, routing)
        self.layers[-1].write_latents(x, cos, sin, cache)

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache, attend_len: int,
        routing: RoutingTrace | None = None,
    ) -> torch.Tensor:
        """One token per cache slot: tokens/positions [B] -> final hidden states [B, 1, H] (after the norm).

        cache.layer(i): layer i's latent rows [slots >= B, max_len, kv_rank + rope] (MLA.decode writes
        token b at positions[b] and attends to rows [0, positions[b]] < attend_len). Static shapes
        and no host reads, so the call can be captured in a CUDA graph (so can recording into routing).
        """
        cos, sin = self.rotary_emb(positions[:, None])  # [B, 1, rope/2]
        x, delta = self.embed_tokens(tokens[:, None]), None  # [B, 1, H]
        for index, layer in enumerate(self.layers):
            x, delta = layer.decode(x, delta, cos, sin, cache.layer(index), positions, attend_len, routing)
        return self.norm.add(x, delta)[1]


class DeepseekV2ForCausalLM(DeepseekV2PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = DeepseekV2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, path, *args, dtype=None, torch_dtype=None, device_map=None, **kwargs):
        """Load a local hub-layout checkpoint directory (V2, V2-Lite, V3 architectures).

        dtype / torch_dtype: torch dtype, its name, or "auto" (the checkpoint's); default float32.
        device_map: a device, its name or index, {"": device}, or "auto" (cuda:0 when present).
        """
        if args or kwargs:
            unknown = list(kwargs) + [repr(a) for a in args]
            raise TypeError(f"from_pretrained: unsupported argument(s) {unknown}")
        model = load_model(cls, path, dtype=dtype if dtype is not None else torch_dtype, device_map=device_map)
        model.config._name_or_path = str(path)  # as transformers records it (TRL reloads its reference model from it)
        return model

    def save_pretrained(self, save_directory, state_dict=None, max_shard_size="5GB", **kwargs) -> None:
        """Write config.json + safetensors in the hub layout (per-expert keys), atomically."""
        self.config.architectures = [type(self).__name__]  # as transformers writes it (AutoConfig users need it)
        save_model(self, save_directory, state_dict=state_dict, max_shard_size=max_shard_size)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool = True,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        cache: Cache | None = None,
        routing: RoutingTrace | None = None,
        token_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutput:
        """Logits [B, S', V] (S' per logits_to_keep); loss when labels are given (transformers'
        causal-LM loss, labels unshifted, -100 ignored, plus the balance loss in training).
        return_logits=False skips the LM head (`last_hidden_state` is always returned); with labels
        the loss is then computed by the fused linear cross-entropy. routing: a RoutingTrace (MoE routing
        recorded per layer, replayed expert ids forced); token_mask [B, S]: tokens the balance loss counts."""
        past_key_values = pick_cache(past_key_values, cache)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        backbone = self.model(
            input_ids, attention_mask, position_ids, inputs_embeds, past_key_values, routing=routing,
            token_mask=token_mask,
        )
        hidden, aux = backbone.last_hidden_state, backbone.aux_loss
        logits = loss = None
        if return_logits:
            logits = self.lm_head(keep_positions(hidden, logits_to_keep))
        if labels is not None:
            loss = self._lm_loss(hidden, logits, labels, kwargs.get("num_items_in_batch"))
            if aux is not None:
                loss = loss + aux
        return CausalLMOutput(
            loss=loss, logits=logits, aux_loss=aux, last_hidden_state=hidden, **{CACHE_FIELD: past_key_values}
        )

    def _lm_loss(self, hidden, logits, labels, num_items_in_batch):
        """transformers' causal-LM loss on the logits, or, without logits, the fused chunked one on
        the hidden states (same value; never holds [tokens, vocab] logits; uses lm_head.weight)."""
        if logits is None:
            return linear_cross_entropy(hidden, self.lm_head.weight, labels, num_items_in_batch)
        if logits.shape[1] != labels.shape[1]:
            raise ValueError(f"labels have {labels.shape[1]} positions but logits_to_keep left {logits.shape[1]}")
        return self.loss_function(logits, labels, self.config.vocab_size, num_items_in_batch=num_items_in_batch)
