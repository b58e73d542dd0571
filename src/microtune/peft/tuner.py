"""The peft tuner of every microtune method: builds the `Method`, attaches it, merges it.

peft's `BaseTuner` replaces target layers one by one; microtune's methods attach to a whole
backbone instead (hooks, a shared z, a global mask). So `MicrotuneTuner.inject_adapter` does what
`microtune.model.TaskModel` does: freeze the model, build the method from the config
(`build_method`) and `attach` it to the backbone (`model.base_model`, the body inside a
`...ForSequenceClassification`) with its architecture map (`arch_for`). The method is held in a
`ModuleDict` named after the tuner's prefix (`microtune_slash`), a child of the tuner, so peft's
own state-dict machinery saves and loads its tensors (`base_model.microtune_slash.z`).

Methods whose forward pass is not hooks alone (PaFi, HiWi: the backbone runs through
`functional_call` with patched weights; JR-WARP: a prompt position in front of the input) run the
backbone through `Method.run_backbone`; the tuner routes the body's forward there.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.other import set_additional_trainable_modules
from torch import nn

from microtune.backbone.arch import arch_for
from microtune.backbone.load import fingerprint
from microtune.errors import MicrotuneError
from microtune.methods import build_method
from microtune.methods.base import Method
from microtune.model import with_bias_flags
from microtune.peft.configs import MicrotunePeftConfig


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer body of a transformers model (`bert` in `BertForSequenceClassification`,
    the model itself when it is a bare `AutoModel`), as `TaskModel` finds it."""
    body = getattr(model, "base_model", model)
    return body if isinstance(body, nn.Module) else model


class RoutedForward:
    """The body's forward, routed through `Method.run_backbone` once per call.

    `run_backbone` calls the body again (directly or through `functional_call`); that inner call
    must run the original forward, hence the flag."""

    def __init__(self, method: Method, backbone: nn.Module):
        self.method, self.backbone = method, backbone
        self.original = backbone.forward
        self.signature = inspect.signature(self.original)
        self.inside = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.inside:
            return self.original(*args, **kwargs)
        inputs = self.named_inputs(args, kwargs)
        self.inside = True
        try:
            return self.method.run_backbone(self.backbone, **inputs)
        finally:
            self.inside = False

    def named_inputs(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Every argument by name, None left out (callers pass positional `input_ids`)."""
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        extra = next(
            (n for n, p in self.signature.parameters.items() if p.kind is p.VAR_KEYWORD), None
        )
        inputs = {**{k: v for k, v in bound.items() if k != extra}, **bound.get(extra, {})}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        if "input_ids" not in inputs:
            raise MicrotuneError(
                f"{self.method.name} runs on token ids: pass input_ids, not inputs_embeds"
            )
        if "attention_mask" not in inputs:  # prompt methods extend the mask: make it explicit
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        return inputs

    def restore(self) -> None:
        """Give the body its own forward back."""
        if self.backbone.__dict__.get("forward") is self:
            del self.backbone.forward


class MicrotuneTuner(BaseTuner):
    """A microtune method as a peft tuner; one adapter per model (a method owns its backbone)."""

    prefix: ClassVar[
        str
    ]  # "microtune_slash_": the methods live in the ModuleDict "microtune_slash"
    tuner_layer_cls = BaseTunerLayer  # no layer is replaced: peft finds none of them
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}

    @property
    def container(self) -> str:
        return self.prefix.rstrip("_")

    def methods(self) -> nn.ModuleDict:
        if self.container not in self._modules:
            self.add_module(self.container, nn.ModuleDict())
        return self._modules[self.container]

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        config = self.peft_config[adapter_name]
        if len(self.methods()) or len(self.peft_config) > 1:
            raise MicrotuneError(
                f"{config.method_name}: one microtune adapter per model; load the base model "
                "again for another adapter"
            )
        backbone = backbone_of(model)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self._record_fingerprint(config, backbone)
        method = build_method(config.method_name, config.method_options())
        method.attach(backbone, arch_for(backbone))
        method.requires_grad_(not config.inference_mode)
        self.methods()[adapter_name] = method
        if not config.dropout:  # the method's choice, as TaskModel.train makes it
            method._hooks.append(backbone.register_forward_pre_hook(_eval_while_training))
        if type(method).run_backbone is not Method.run_backbone:
            backbone.forward = RoutedForward(method, backbone)
        self._add_modules_to_save(model, config, adapter_name)

    def _record_fingerprint(self, config: MicrotunePeftConfig, backbone: nn.Module) -> None:
        found = fingerprint(backbone)
        if config.base_fingerprint not in (None, found):
            raise MicrotuneError(
                f"base model mismatch: this adapter was trained on a base with "
                f"{config.base_fingerprint[:19]}…, this one has {found[:19]}…; load the "
                "original base model"
            )
        config.base_fingerprint = found

    def _add_modules_to_save(
        self, model: nn.Module, config: MicrotunePeftConfig, adapter_name: str
    ) -> None:
        # peft's own step for modules_to_save (the task head), as its inject_adapter ends.
        set_additional_trainable_modules(
            model=model,
            peft_config=config,
            model_config=BaseTuner.get_model_config(self),
            adapter_name=adapter_name,
        )

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("microtune tuners attach whole methods; no layer is replaced")

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """`base_model.microtune_hiwi.default.adapters.0-ffn_in.A` is saved without the adapter
        name wherever it sits (peft's default drops it only next to the tensor name)."""
        container = cls.prefix.rstrip("_")
        return key.replace(f"{container}.{adapter_name}.", f"{container}.", 1)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        if not enabled:
            raise MicrotuneError(
                f"{self.prefix.rstrip('_')}: a microtune adapter cannot be switched off; "
                "use unload() for the base model"
            )

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        backbone = backbone_of(self.model)
        for method in self.methods().values():
            if merge:
                method.require_mergeable()
                created = method.merge(backbone, arch_for(backbone))
                if created:  # the stock config then says the created biases exist
                    self.model.config = with_bias_flags(
                        backbone, arch_for(backbone), created
                    ).config
            elif getattr(method, "merged", False):
                method.unmerge()  # PaFi merged for serving: the base's own bits back
            method.detach()
        routed = backbone.__dict__.get("forward")
        if isinstance(routed, RoutedForward):
            routed.restore()
        self._modules.pop(self.container, None)
        return super()._unload_and_optionally_merge(merge, progressbar, safe_merge, adapter_names)


def _eval_while_training(module: nn.Module, args: tuple) -> None:
    """Frozen blocks without dropout, as microtune trains SLaSh and JR-WARP by default."""
    if module.training:
        module.eval()


def tuner_class(config_class: type[MicrotunePeftConfig]) -> type[MicrotuneTuner]:
    """The tuner class of one microtune method (`MicrotuneSlashTuner`, prefix
    "microtune_slash_")."""
    name = config_class.method_name
    return type(
        f"Microtune{name.capitalize()}Tuner",
        (MicrotuneTuner,),
        {"prefix": f"microtune_{name}_", "__module__": __name__},
    )
