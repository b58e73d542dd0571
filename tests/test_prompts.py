"""WARP and JR-WARP on every architecture: what trains, where the prompt goes, what reads it."""

import copy

import pytest
import torch

from microtune.backbone.load import load_backbone
from microtune.errors import MicrotuneError
from microtune.methods import build_method
from microtune.methods.prompts import block_inputs
from microtune.model import HeadConfig, TaskModel
from microtune.tasks.types import loss_fn

from .conftest import ARCH_TYPES, FAMILY_TYPES, VOCAB_SIZE, tiny_batch

D = 16  # length of z
K = 3  # WARP prompts
HIDDEN = 32  # hidden size of the tiny models
OPTIONS = {"jrwarp": {"d": D}, "warp": {"num_prompts": K}}
METHOD_NAMES = tuple(OPTIONS)


def prompt_model(folder, method, readout="first", z_scale=1.0, **options):
    backbone, tokenizer = load_backbone(str(folder))
    torch.manual_seed(0)
    model = TaskModel(
        backbone,
        HeadConfig(num_labels=3, readout=readout),
        build_method(method, {**OPTIONS[method], **options}),
        mask_token_id=tokenizer.mask_token_id,
    )
    if method == "jrwarp":
        with torch.no_grad():
            model.method.z.mul_(z_scale)
    return model.eval(), tokenizer


def backbone_inputs(model, batch):
    keep = {"input_ids", "attention_mask"} | (
        {"token_type_ids"} if model.arch.token_type_ids else set()
    )
    return {k: v for k, v in batch.items() if k in keep}


def record_blocks(blocks):
    """Dicts filled on the next forward: the hidden state entering and leaving each block."""
    entering, leaving = {}, {}
    for layer, block in enumerate(blocks):
        # Registered after the method's hook, so this sees what the block really receives.
        block.register_forward_pre_hook(
            lambda m, a, kw, layer=layer: entering.update(
                {layer: a[0] if a else kw["hidden_states"]}
            ),
            with_kwargs=True,
        )
        block.register_forward_hook(
            lambda m, a, out, layer=layer: leaving.update(
                {layer: out if isinstance(out, torch.Tensor) else out[0]}
            )
        )
    return entering, leaving


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_shapes_and_only_prompt_parameters_train(model_type, method, tiny_model_dirs):
    model, tokenizer = prompt_model(tiny_model_dirs[model_type], method)
    batch = tiny_batch(tokenizer)
    trainable = model.trainable_state()
    own = "method.z" if method == "jrwarp" else "method.prompts"
    assert sorted(trainable) == ["head.linear.bias", "head.linear.weight", own]
    method_count = D if method == "jrwarp" else K * HIDDEN
    assert model.count_trainable() == {
        "head": HIDDEN * 3 + 3,
        "method": method_count,
        "total": method_count + HIDDEN * 3 + 3,
    }
    assert model.method.mergeable is False

    # The backbone output TaskModel sees has the original length (token classification works).
    with torch.no_grad():
        hidden = model.method.run_backbone(model.backbone, **backbone_inputs(model, batch))
    assert hidden.last_hidden_state.shape == (*batch["input_ids"].shape, HIDDEN)

    before_backbone = copy.deepcopy(model.backbone.state_dict())
    before_method = {k: v.clone() for k, v in model.method.state_dict().items()}
    before_trainable = {k: v.detach().clone() for k, v in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=0.1)
    model.train()
    logits = model(**batch)
    assert logits.shape == (4, 3)
    loss_fn(logits, torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    for name, value in trainable.items():
        assert not torch.equal(value, before_trainable[name]), f"{name} did not train"
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, before_backbone[name]), f"{name} changed"
    for name, value in model.method.state_dict().items():
        if f"method.{name}" not in trainable:
            assert torch.equal(value, before_method[name]), f"{name} changed"


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_real_tokens_keep_their_positions(model_type, method, tiny_model_dirs, monkeypatch):
    """With the prompt positions masked out, the real tokens must compute exactly what the plain
    backbone computes: same position ids (RoBERTa's offset, Llama's rotary), token types,
    padding and causal masks, and the prompt dropped from the output (and from the pooler)."""
    model, tokenizer = prompt_model(tiny_model_dirs[model_type], method, z_scale=5.0)
    backbone = model.backbone
    inputs = backbone_inputs(model, tiny_batch(tokenizer, pair=True))
    with torch.no_grad():
        plain = backbone(**inputs)
        prompted = model.method.run_backbone(backbone, **inputs)
        forward = backbone.forward
        k = model.method.num_prompts

        def prompt_masked_out(**kwargs):
            mask = kwargs["attention_mask"].clone()
            mask[:, :k] = 0
            return forward(**{**kwargs, "attention_mask": mask})

        monkeypatch.setattr(backbone, "forward", prompt_masked_out)
        masked = model.method.run_backbone(backbone, **inputs)
    real = inputs["attention_mask"].bool()
    assert masked.last_hidden_state.shape == plain.last_hidden_state.shape
    assert (masked.last_hidden_state - plain.last_hidden_state)[real].abs().max() <= 1e-5
    # ... and the prompt, when visible, does change them (so the comparison above has teeth).
    assert (prompted.last_hidden_state - plain.last_hidden_state)[real].abs().max() > 1e-3
    if model.arch.pooler is not None:  # a mapped pooler must read the real first token
        assert torch.allclose(masked.pooler_output, plain.pooler_output, atol=1e-5)


@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_jrwarp_prompt_is_replaced_then_accumulated(model_type, tiny_model_dirs):
    model, tokenizer = prompt_model(tiny_model_dirs[model_type], "jrwarp", z_scale=5.0)
    blocks = model.arch.blocks_of(model.backbone)
    entering, leaving = record_blocks(blocks)
    with torch.no_grad():
        model(**tiny_batch(tokenizer))
        prompts = [model.method.z @ model.method.bank.matrix(layer) for layer in range(len(blocks))]
    assert torch.allclose(entering[0][:, 0], prompts[0].expand(4, -1), atol=1e-6)
    for layer in range(1, len(blocks)):
        expected = leaving[layer - 1][:, 0] + prompts[layer]
        assert torch.allclose(entering[layer][:, 0], expected, atol=1e-6)
        assert torch.equal(entering[layer][:, 1:], leaving[layer - 1][:, 1:])


@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_warp_prompts_enter_the_first_block_only(model_type, tiny_model_dirs):
    model, tokenizer = prompt_model(tiny_model_dirs[model_type], "warp")
    blocks = model.arch.blocks_of(model.backbone)
    entering, leaving = record_blocks(blocks)
    with torch.no_grad():
        model(**tiny_batch(tokenizer))
    assert torch.equal(entering[0][:, :K], model.method.prompts.expand(4, K, HIDDEN))
    for layer in range(1, len(blocks)):
        assert torch.equal(entering[layer], leaving[layer - 1])


@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_warp_token_init_starts_from_real_block_inputs(model_type, tiny_model_dirs):
    model, _ = prompt_model(tiny_model_dirs[model_type], "warp")
    every_token = block_inputs(model.backbone, model.arch, torch.arange(VOCAB_SIZE))
    # Explicit differences: cdist's matrix-product shortcut loses ~1e-3 to cancellation.
    distances = (model.method.prompts.detach()[:, None] - every_token[None]).norm(dim=-1)
    assert distances.min(1).values.max() <= 1e-6  # each prompt is some token's block input
    assert len(set(distances.argmin(1).tolist())) > 1  # and not all the same token


@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_jrwarp_cache_gives_identical_outputs_and_follows_z(model_type, tiny_model_dirs):
    model, tokenizer = prompt_model(tiny_model_dirs[model_type], "jrwarp", z_scale=5.0)
    method = model.method
    batch = tiny_batch(tokenizer)
    computed = []
    real_prompt_vectors = method.prompt_vectors
    method.prompt_vectors = lambda: computed.append(1) or real_prompt_vectors()

    with torch.no_grad():
        cached = [model(**batch) for _ in range(3)]
        assert len(computed) == 1  # computed once for three inference passes
        method.cache_prompts = False
        uncached = model(**batch)
        assert len(computed) == 2
        method.cache_prompts = True
        for logits in cached:
            assert torch.equal(logits, uncached)

        method.z.add_(1.0)  # a new z must invalidate the cache
        moved = model(**batch)
        method.cache_prompts = False
        moved_uncached = model(**batch)
    assert not torch.allclose(moved, uncached, atol=1e-4)
    assert torch.equal(moved, moved_uncached)

    # With gradients the prompts are recomputed, so z gets a gradient.
    method.cache_prompts = True
    model(**batch).sum().backward()
    assert method.z.grad is not None and method.z.grad.abs().sum() > 0


@pytest.mark.parametrize("readout", ["mean", "last", "first"])
@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_padding_does_not_change_an_example(model_type, method, readout, tiny_model_dirs):
    model, tokenizer = prompt_model(tiny_model_dirs[model_type], method, readout, z_scale=5.0)
    short, long = "love it", "the film is good , the story is not dull and the actors are great"
    alone = tokenizer([short], return_tensors="pt")
    padded = tokenizer([short, long], padding=True, return_tensors="pt")
    assert padded["input_ids"].shape[1] > alone["input_ids"].shape[1] + 5
    with torch.no_grad():
        by_itself = model(**alone)[0]
        batched = model(**padded)[0]
    assert torch.allclose(by_itself, batched, atol=1e-5), (by_itself - batched).abs().max()


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_mask_readout_reads_the_mask_token(model_type, method, tiny_model_dirs):
    model, tokenizer = prompt_model(tiny_model_dirs[model_type], method, "mask", z_scale=5.0)
    batch = tiny_batch(tokenizer)
    mask_at = torch.tensor([2, 4, 1, 3])
    ids = batch["input_ids"].clone()
    ids[torch.arange(4), mask_at] = tokenizer.mask_token_id
    batch["input_ids"] = ids
    full, features = {}, {}
    # The backbone's own output, before the method drops the prompt positions.
    model.backbone.register_forward_hook(lambda m, a, out: full.update(h=out.last_hidden_state))
    model.head.register_forward_pre_hook(lambda m, a: features.update(x=a[0]))
    with torch.no_grad():
        model(**batch)
    k = model.method.num_prompts
    rows = torch.arange(4)
    assert full["h"].shape[1] == ids.shape[1] + k
    assert torch.equal(features["x"], full["h"][rows, mask_at + k])
    # Not the token one before the mask (the original code's slip):
    assert not torch.allclose(features["x"], full["h"][rows, mask_at + k - 1], atol=1e-3)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_prompt_methods_cannot_merge(method, tiny_model_dirs):
    model, _ = prompt_model(tiny_model_dirs["bert"], method)
    with pytest.raises(MicrotuneError, match="cannot be merged"):
        model.merge()


def test_bad_options_are_one_line_errors():
    for method, options, fragment in (
        ("warp", {"num_prompts": 0}, "num_prompts must be a positive integer"),
        ("warp", {"prompt_init": "ones"}, "prompt_init 'ones' unknown"),
        ("warp", {"d": 8}, "unknown option"),
        ("jrwarp", {"d": 0}, "jrwarp: d must be an integer in 1..1048576"),
        ("jrwarp", {"z_init": "ones"}, "jrwarp: z_init 'ones' unknown"),
        ("jrwarp", {"position": "output"}, "unknown option"),
    ):
        with pytest.raises(MicrotuneError, match=fragment) as error:
            build_method(method, options)
        assert "\n" not in str(error.value)


def test_cli_trains_and_reloads_jrwarp_memory_lean(tiny_model_dirs, data_dir, tmp_path):
    """A few-step smoke run through the CLI on a tiny model; the artifact records the option."""
    from microtune.artifacts.store import load_artifact
    from microtune.cli import build_parser, run

    args = ["train", "--task", "sst2", "--model", str(tiny_model_dirs["bert"])]
    args += ["--data-dir", str(data_dir), "--max-train-examples", "16", "--max-steps", "2"]
    args += ["--eval-every", "0", "--checkpoint-every", "0", "--no-progress"]
    args += ["--method", "jrwarp", "--memory-lean", "--d", "16", "--output", str(tmp_path)]
    assert build_parser().parse_args(args).method_memory_lean is True
    report = run(args)
    assert report["trainable_parameters"]["method"] == 16
    model, _, config = load_artifact(tmp_path)
    assert config["method"] == "jrwarp"
    assert config["method_config"]["memory_lean"] is True
    assert model.method.config.memory_lean is True
    with pytest.raises(MicrotuneError, match="--num-prompts does not apply to method 'jrwarp'"):
        run(args + ["--num-prompts", "4"])
