"""eftmesh's own forward for the architectures it serves most (--model-impl): the same ops as
transformers' modeling code, without its per-layer Python.

vLLM and SGLang run their own model implementations rather than transformers' (vLLM's
`--model-impl auto` picks its own where it has one, transformers' otherwise), because a decode
step of a small model is bound by the host. transformers' eager forward runs about the same
aten ops as this one (1,081 against 1,050 per decode step of the 1B Llama shape), but wraps
them in Python: module calls, hooks, decorators, keyword plumbing, output records: about 4 ms
of the demo base-large's 9 ms decode step on a CPU. Here the weights stay
in the transformers model as loaded (nothing is copied or converted); only the forward is
ours, and it reads them in place.

Exact by construction: every op is the one transformers runs, in its order and dtype (its
sdpa attention's GQA handling included), so float32 logits are bitwise equal to transformers'
over the same paged cache (tests/test_native.py checks prefill, decode and verify steps, mixed
batches, on the demo family and on small random Llama configs). An architecture or a config
option not covered here (e.g. GPT-2's `reorder_and_upcast_attn`, a model sharded over
devices) runs transformers' forward: `native_forward` returns None and says why.

The forward's arguments are the runner's: ids [rows, n], positions [rows, n], the additive
attention mask [rows, 1, n, length], the paged cache's view (kvcache.BatchView or
runner.StaticView: `update(k, v, layer)` writes the new keys and values and returns the
gathered ones) and, optionally, the query columns to project ([rows, keep]; all when None).
It returns [rows, keep or n, vocab] logits. No gRPC here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MODEL_IMPLS = ("auto", "native", "transformers")

Forward = Callable[..., torch.Tensor]


def _keep(h: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The hidden states of the query columns `keep` ([rows, keep]) of each row, as
    transformers' slice_logits_to_keep takes them; all of them when None."""
    return h if keep is None else torch.take_along_dim(h, keep[..., None], dim=1)


class GPT2Forward:
    """GPT2LMHeadModel's forward (transformers' GPT2Model with sdpa attention)."""

    def __init__(self, model: Any) -> None:
        cfg, tr = model.config, model.transformer
        self.wte, self.wpe, self.lm_head = tr.wte.weight, tr.wpe.weight, model.lm_head
        self.eps = cfg.layer_norm_epsilon
        self.heads = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.ln_f = (tr.ln_f.weight, tr.ln_f.bias)
        # per layer: ln_1, c_attn, its attention scale, attn.c_proj, ln_2, c_fc, the activation
        # module, mlp.c_proj
        self.layers = [((b.ln_1.weight, b.ln_1.bias), (b.attn.c_attn.weight, b.attn.c_attn.bias), b.attn.scaling,
                        (b.attn.c_proj.weight, b.attn.c_proj.bias), (b.ln_2.weight, b.ln_2.bias),
                        (b.mlp.c_fc.weight, b.mlp.c_fc.bias), b.mlp.act, (b.mlp.c_proj.weight, b.mlp.c_proj.bias))
                       for b in tr.h]

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
        h = F.embedding(ids, self.wte) + F.embedding(positions, self.wpe)  # [rows, n, d]
        rows, n, d = h.shape
        heads, hd, eps = self.heads, self.head_dim, self.eps
        for i, (ln1, attn, scale, proj, ln2, fc, act, out) in enumerate(self.layers):
            x = F.layer_norm(h, (d,), ln1[0], ln1[1], eps)
            # transformers' Conv1D: addmm(bias, x, weight) with the weight stored [in, out]
            qkv = torch.addmm(attn[1], x.view(-1, d), attn[0]).view(rows, n, 3, heads, hd)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [rows, heads, n, hd]
            k, v = cache.update(k, v, i)  # [rows, heads, length, hd]
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            a = a.transpose(1, 2).reshape(rows * n, d)
            h = h + torch.addmm(proj[1], a, proj[0]).view(rows, n, d)
            x = F.layer_norm(h, (d,), ln2[0], ln2[1], eps)
            x = act(torch.addmm(fc[1], x.view(-1, d), fc[0]))
            h = h + torch.addmm(out[1], x, out[0]).view(rows, n, d)
        h = F.layer_norm(_keep(h, keep), (d,), self.ln_f[0], self.ln_f[1], eps)
        return self.lm_head(h)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, op for op (float32 inside, the weight applied after)."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for one tensor (cos and sin already unsqueezed)."""
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


def _linear(x: torch.Tensor, m: Any) -> torch.Tensor:
    return F.linear(x, m.weight, m.bias)


class LlamaForward:
    """LlamaForCausalLM's forward (transformers' LlamaModel with sdpa attention). The rotary
    embedding is the model's own module, so every rope type it supports (llama3, yarn, ...) is."""

    def __init__(self, model: Any) -> None:
        cfg, base = model.config, model.model
        self.embed, self.lm_head, self.rotary = base.embed_tokens.weight, model.lm_head, base.rotary_emb
        self.eps = cfg.rms_norm_eps
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.groups = self.heads // self.kv_heads
        self.norm = base.norm.weight
        self.layers = [(b.input_layernorm.weight, b.self_attn, b.post_attention_layernorm.weight, b.mlp)
                       for b in base.layers[: cfg.num_hidden_layers]]
        self.head_dim = self.layers[0][1].head_dim
        self.scale = self.layers[0][1].scaling

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """transformers' sdpa_attention_forward with a mask: a single query column runs on the
        key-value heads (pack_gqa), more columns repeat them (repeat_kv). [rows, n, heads * hd]."""
        rows, _, n, hd = q.shape
        if self.groups > 1 and n == 1:
            q = q.reshape(rows, self.kv_heads, self.groups, hd)
        elif self.groups > 1:
            length = k.shape[2]
            k = k[:, :, None].expand(rows, self.kv_heads, self.groups, length, hd).reshape(rows, self.heads, length, hd)
            v = v[:, :, None].expand(rows, self.kv_heads, self.groups, length, hd).reshape(rows, self.heads, length, hd)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return a.reshape(rows, -1, n, hd).transpose(1, 2).reshape(rows, n, -1)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
        h = F.embedding(ids, self.embed)  # [rows, n, d]
        rows, n, _ = h.shape
        cos, sin = self.rotary(h, position_ids=positions)  # [rows, n, hd]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        eps, hd = self.eps, self.head_dim
        for i, (ln1, attn, ln2, mlp) in enumerate(self.layers):
            x = _rms_norm(h, ln1, eps)
            q = _linear(x, attn.q_proj).view(rows, n, -1, hd).transpose(1, 2)
            k = _linear(x, attn.k_proj).view(rows, n, -1, hd).transpose(1, 2)
            v = _linear(x, attn.v_proj).view(rows, n, -1, hd).transpose(1, 2)
            k, v = cache.update(_rotate(k, cos, sin), v, i)
            h = h + _linear(self._attend(_rotate(q, cos, sin), k, v, mask), attn.o_proj)
            x = _rms_norm(h, ln2, eps)
            h = h + _linear(mlp.act_fn(_linear(x, mlp.gate_proj)) * _linear(x, mlp.up_proj), mlp.down_proj)
        return self.lm_head(_rms_norm(_keep(h, keep), self.norm, eps))


def _gpt2_unsupported(cfg: Any) -> str | None:
    if getattr(cfg, "reorder_and_upcast_attn", False):
        return "reorder_and_upcast_attn"
    return None


def _llama_unsupported(cfg: Any) -> str | None:
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return f"pretraining_tp {cfg.pretraining_tp}"
    return None


# transformers class name -> (our forward, what of its config we do not cover)
ARCHITECTURES: dict[str, tuple[Callable[[Any], Forward], Callable[[Any], str | None]]] = {
    "GPT2LMHeadModel": (GPT2Forward, _gpt2_unsupported),
    "LlamaForCausalLM": (LlamaForward, _llama_unsupported),
}


def native_forward(model: Any, impl: str = "auto", *, sharded: bool = False) -> Forward | None:
    """Our forward of `model` under --model-impl `impl`; None to run transformers' own.

    "auto" takes ours where this module covers the model (its class, its config, on one
    device, attention through sdpa) and transformers' otherwise; "native" insists (a model it
    does not cover is an error naming why); "transformers" always runs transformers' forward.
    """
    if impl not in MODEL_IMPLS:
        raise ValueError(f"--model-impl must be one of {', '.join(MODEL_IMPLS)}, got {impl!r}")
    if impl == "transformers":
        return None
    name = type(model).__name__
    entry = ARCHITECTURES.get(name)
    why = (f"no native forward for {name} (there is for {', '.join(ARCHITECTURES)})" if entry is None
           else "the model is sharded over devices (--device-map)" if sharded
           else f"attention implementation {model.config._attn_implementation!r}, not sdpa"
           if model.config._attn_implementation != "sdpa" else entry[1](model.config))
    if why is not None:
        if impl == "native":
            raise ValueError(f"--model-impl native: {why}; use --model-impl auto or transformers")
        log.info("transformers' forward runs this model: %s", why)
        return None
    try:
        return entry[0](model)
    except AttributeError as e:  # a transformers release whose modules are laid out otherwise
        if impl == "native":
            raise ValueError(f"--model-impl native: {name} is laid out otherwise than native.py reads it ({e}); "
                             "use --model-impl auto or transformers") from None
        log.warning("transformers' forward runs this model: %s is laid out otherwise than native.py reads it (%s)",
                    name, e)
        return None
