"""Mapping a model type the architecture map does not declare, by its structure.

The blocks are the one `ModuleList` of `config.num_hidden_layers` modules of one class. Inside
a block, a short forward pass (two 3-token rows that differ only in their last token) records
the order in which linears and norms run, and whether the first positions ignore the last
token (causal attention). From the linears' shapes (D = hidden size):

- the two linears that map back to D are the attention output and then the FFN output, whose
  input width is the intermediate size F;
- the FFN input is the linear between them from D to F (or 2F where gate and up are fused);
  of two (a SwiGLU's gate and up), the one named "gate";
- the linears from D before the attention output are query, key and value (three, in call
  order), or one fused projection;
- norms are the modules called "*Norm*" that are norms in every block; the block is pre-LN if
  a norm runs before any linear, and in a post-LN block the norm after the attention output is
  the attention norm.

Bias flags are the boolean config attributes named "*bias*" that add a bias to one of these
parts (checked by building the model on the meta device). Anything ambiguous is refused with a
one-line error naming what could not be found.
"""

from __future__ import annotations

import copy
import inspect
import re
from typing import NamedTuple

import torch
from torch import nn

from microtune.backbone.archspec import (
    ArchSpec,
    UnsupportedModelError,
    input_dim,
    is_conv1d,
    output_dim,
)


class _Linear(NamedTuple):
    path: str
    fan_in: int
    fan_out: int


_ROLE_HINTS = (("q", "query"), ("k", "key"), ("v", "value"))


def discover_arch(backbone: nn.Module) -> ArchSpec:
    """An `ArchSpec` for `backbone` found by structure; `UnsupportedModelError` if ambiguous."""
    model_type = backbone.config.model_type

    def refuse(problem: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"model type '{model_type}' is not in the architecture map and its layout could not "
            f"be discovered: {problem} (add an ArchSpec in microtune/arch.py)"
        )

    blocks_path = _find_blocks(backbone, refuse)
    blocks = backbone.get_submodule(blocks_path)
    order, causal = _trace(backbone, blocks[-1], refuse)
    block = blocks[-1]
    linears = [
        _Linear(path, input_dim(module), output_dim(module))
        for path in order
        if _is_linear(module := block.get_submodule(path))
    ]
    embeddings = backbone.get_input_embeddings()
    hidden = _hidden_size(backbone, refuse)

    attn_out, ffn_in, ffn_out, attention_in = _roles(linears, hidden, refuse)
    attention = _attention([linear.path for linear in attention_in], refuse)
    norms, pre_norm, attn_norm = _block_norms(
        order, blocks, {x.path for x in linears}, hidden, attention_in[0].path, attn_out, ffn_in
    )
    parts = {"attn_out": attn_out.path, "ffn_in": ffn_in.path, "ffn_out": ffn_out.path}
    return ArchSpec(
        blocks=blocks_path,
        attn_out=attn_out.path,
        attn_norm=attn_norm,
        ffn_in=ffn_in.path,
        ffn_out=ffn_out.path,
        norms=norms,
        embeddings=_path_of(backbone, embeddings, refuse),
        attention=attention,
        pooler=_pooler(backbone),
        pre_norm=pre_norm,
        causal=causal,
        bias_flags=_bias_flags(backbone, blocks_path, parts),
        token_type_ids=_takes_token_types(backbone),
    )


def _roles(linears: list[_Linear], hidden: int, refuse) -> tuple:
    """(attention output, FFN input, FFN output, the linears before the attention output)."""
    # The last linear back to D ends the FFN; the one before it ends attention (q, k and v
    # may map D -> D as well, but they run before the attention output).
    to_hidden = [i for i, linear in enumerate(linears) if linear.fan_out == hidden]
    if len(to_hidden) < 2:
        raise refuse(f"found fewer than 2 linear layers back to the hidden size {hidden}")
    start, end = to_hidden[-2], to_hidden[-1]
    attn_out, ffn_out = linears[start], linears[end]
    intermediate = ffn_out.fan_in
    attention_in = linears[:start]
    ffn_ins = linears[start + 1 : end]
    unexplained = [
        linear.path
        for linear in attention_in + ffn_ins
        if linear.fan_in != hidden
        or (linear in ffn_ins and linear.fan_out not in (intermediate, 2 * intermediate))
    ]
    if unexplained:
        raise refuse(
            f"linear layers that fit no attention or FFN role: {', '.join(unexplained)} (taking "
            f"{attn_out.path} as the attention output and {ffn_out.path} as the FFN output; a "
            "mixture of experts or extra projections?)"
        )
    if len(ffn_ins) == 2:  # SwiGLU: the gate's output enters the activation
        ffn_ins = [x for x in ffn_ins if "gate" in x.path.rsplit(".", 1)[-1]] or ffn_ins
    if len(ffn_ins) != 1:
        found = ", ".join(linear.path for linear in ffn_ins) or "none"
        raise refuse(
            f"could not tell the FFN's first linear ({hidden} -> {intermediate}); found: {found}"
        )
    return attn_out, ffn_ins[0], ffn_out, attention_in


def _block_norms(
    order: list[str],
    blocks: nn.Module,
    linear_paths: set[str],
    hidden: int,
    attention_start: str,
    attn_out: _Linear,
    ffn_in: _Linear,
) -> tuple[tuple[str, ...], bool, str | None]:
    """(the norms of every block, whether blocks are pre-norm, the norm after attention)."""
    block = blocks[-1]

    # Norms inside attention (Qwen3's, OLMo2's q_norm and k_norm) are not block norms.
    inside_attention = set(order[order.index(attention_start) : order.index(attn_out.path)])
    block_norms = [
        path
        for path in order
        if path not in inside_attention
        and _is_norm(block.get_submodule(path))
        and _width(block.get_submodule(path)) in (hidden, None)
    ]
    # Listed only if a norm in every block (ModernBERT's block 0 has an Identity there).
    norms = tuple(p for p in block_norms if all(_is_norm(_optional(b, p)) for b in blocks))
    sequence = [path for path in order if path in block_norms or path in linear_paths]
    pre_norm = sequence[0] in block_norms
    attn_norm = None
    if not pre_norm:
        after = sequence[sequence.index(attn_out.path) + 1 : sequence.index(ffn_in.path)]
        attn_norm = next((path for path in after if path in norms), None)

    return norms, pre_norm, attn_norm


def _find_blocks(backbone: nn.Module, refuse) -> str:
    count = getattr(backbone.config, "num_hidden_layers", None)
    if not isinstance(count, int) or count < 1:
        raise refuse("the config has no num_hidden_layers")
    found = [
        path
        for path, module in backbone.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == count
        and len({type(child) for child in module}) == 1
        and any(True for _ in module.parameters())
    ]
    # A ModuleList inside a block (experts, say) is not the block list.
    outermost = [p for p in found if not any(p.startswith(q + ".") for q in found if q != p)]
    if len(outermost) != 1:
        listed = ", ".join(outermost) or "none"
        raise refuse(
            f"expected one ModuleList of num_hidden_layers ({count}) blocks of one class, "
            f"found: {listed}"
        )
    return outermost[0]


@torch.no_grad()
def _trace(backbone: nn.Module, block: nn.Module, refuse) -> tuple[list[str], bool]:
    """(block-relative paths of leaf modules in first-call order, causal attention?)."""
    order: list[str] = []
    handles = []
    for path, module in block.named_modules():
        if path and not any(module.children()):

            def record(module, args, output, path=path):
                if path not in order:
                    order.append(path)

            handles.append(module.register_forward_hook(record))
    vocab = backbone.get_input_embeddings().weight.shape[0]
    device = next(backbone.parameters()).device
    ids = (torch.tensor([[1, 2, 3], [1, 2, 4]]) % vocab).to(device)
    was_training = backbone.training
    backbone.eval()
    try:
        outputs = backbone(input_ids=ids, attention_mask=torch.ones_like(ids))
    except Exception as error:  # any failure means the generic call does not fit this model
        first_line = (str(error).strip().splitlines() or [""])[0]
        problem = f"a forward pass on input_ids failed ({type(error).__name__}: {first_line})"
        raise refuse(problem) from None
    finally:
        for handle in handles:
            handle.remove()
        backbone.train(was_training)
    hidden = getattr(outputs, "last_hidden_state", None)
    hidden = outputs[0] if hidden is None else hidden
    # Causal: the first two positions cannot see the last token, the only one that differs.
    first, second = hidden[0, :2].float(), hidden[1, :2].float()
    causal = bool(torch.allclose(first, second, rtol=1e-3, atol=1e-4 * first.abs().max().item()))
    return order, causal


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _is_norm(module: nn.Module | None) -> bool:
    return module is not None and "norm" in type(module).__name__.lower()


def _width(module: nn.Module) -> int | None:
    try:
        return output_dim(module)
    except TypeError:  # a norm without weights (OLMo's): width unknown, still a norm
        return None


def _optional(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _hidden_size(backbone: nn.Module, refuse) -> int:
    hidden = getattr(backbone.config, "hidden_size", None)
    if not isinstance(hidden, int):
        raise refuse("the config has no hidden_size")
    return hidden


def _attention(paths: list[str], refuse) -> tuple[str, str, str]:
    """q, k, v: one fused projection, or three (by name where names say, else call order)."""
    if len(paths) == 1:
        return (paths[0], paths[0], paths[0])
    if len(paths) != 3:
        found = ", ".join(paths) or "none"
        raise refuse(
            f"expected the attention's query, key and value as 3 linears or 1 fused, found: {found}"
        )
    by_role = []
    for hints in _ROLE_HINTS:
        pattern = re.compile(rf"(^|_)({'|'.join(hints)})(_proj|_lin)?$")
        named = [p for p in paths if pattern.search(p.rsplit(".", 1)[-1])]
        by_role.append(named[0] if len(named) == 1 else None)
    if None not in by_role and len(set(by_role)) == 3:
        return tuple(by_role)
    return (paths[0], paths[1], paths[2])


def _path_of(backbone: nn.Module, target: nn.Module, refuse) -> str:
    for path, module in backbone.named_modules():
        if module is target:
            return path
    raise refuse("the input embeddings are not a submodule of the backbone")


def _pooler(backbone: nn.Module) -> str | None:
    """ "pooler" where the backbone has one fed the whole sequence (not a bare Linear)."""
    pooler = getattr(backbone, "pooler", None)
    if isinstance(pooler, nn.Module) and not isinstance(pooler, nn.Linear):
        return "pooler"
    return None


def _takes_token_types(backbone: nn.Module) -> bool:
    accepts = "token_type_ids" in inspect.signature(backbone.forward).parameters
    return accepts and getattr(backbone.config, "type_vocab_size", 0) >= 2


def _bias_flags(backbone: nn.Module, blocks_path: str, parts: dict[str, str]) -> dict[str, str]:
    """The boolean "*bias*" config attributes that add a bias to a part, part -> flag."""
    config = backbone.config
    names = [
        name for name, value in vars(config).items() if isinstance(value, bool) and "bias" in name
    ]
    flags: dict[str, str] = {}
    for name in names:
        has_bias = {}
        for value in (False, True):
            edited = copy.deepcopy(config)
            setattr(edited, name, value)
            try:
                with torch.device("meta"):
                    reference = type(backbone)(edited)
            except Exception:  # a flag the model cannot be built with: not a bias switch
                break
            block = reference.get_submodule(blocks_path)[0]
            has_bias[value] = {
                part: getattr(block.get_submodule(path), "bias", None) is not None
                for part, path in parts.items()
            }
        else:
            for part in parts:
                if has_bias[True][part] and not has_bias[False][part]:
                    flags.setdefault(part, name)
    return flags
