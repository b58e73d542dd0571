"""Causal language modelling: next-token prediction with the base model's own (frozen) LM head.

Data is JSONL with `prompt`/`response` (the loss covers the response and an appended EOS; the
prompt's tokens are labelled -100) or plain `text` (every token is scored). Prompt and response
are tokenised apart and concatenated, with no chat template: the prompt's tokens at generation
are then exactly those seen in training. The base is loaded with `AutoModelForCausalLM`; the
method attaches to its decoder body as for any other task, and the head is its LM head (tied to
the embeddings where the model ties them), frozen: a causal-LM artifact stores no head.

Dev metrics: `loss` (the mean over scored tokens), `perplexity` (its exp) and, for
prompt/response data, `exact_match` of greedy answers (generated through the method's hooks,
up to the reference length + 4 tokens, stripped text against the stripped reference).

A head tied to the embeddings is the embedding: a method that trains the embedding trains the
head with it (`full`, as in `transformers`; see `LMHead`). `microtune export` compares the
merged model's logits on at most `CausalLM.export_check_examples` dev rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from microtune.backbone.load import backbone_dtype
from microtune.errors import MicrotuneError
from microtune.tasks.data import IGNORE_INDEX, batches, collate
from microtune.tasks.inference import Outputs, evaluation_batches
from microtune.tasks.probe import logits_match, probe_batch, task_logits
from microtune.tasks.spec import Example
from microtune.tasks.types.base import TaskType

# Tokens a greedy answer may run past its reference's length before it is cut (exact match).
EXTRA_ANSWER_TOKENS = 4
# Scored positions whose vocabulary-wide logits are computed at once in evaluation.
LOGIT_CHUNK = 1024
PAIR_COLUMNS = ("prompt", "response")
TEXT_COLUMNS = ("text",)


class LMHead(nn.Module):
    """The base model's output embedding (its LM head), frozen: hidden states -> vocabulary
    logits. `linear` is that module itself, so a tied weight stays the embedding's.

    Tied to the input embedding (GPT-2, SmolLM2), the head computes with the weight the body's
    embedding used in the latest forward pass, seen by a pre-hook: a method that substitutes
    the embedding (float32 masters of `full` on a bfloat16 base) then changes the head with it,
    as the merge does (it writes the embedding into the shared tensor). On a float32 base, `full`
    trains the shared tensor in place, so the tied head trains with it (as in `transformers`).
    """

    def __init__(self, linear: nn.Module, embedding: nn.Module | None = None):
        super().__init__()
        self.linear = linear
        for parameter in linear.parameters():
            parameter.requires_grad_(False)
        # The embedding's weight in the latest forward pass, where it is not `linear.weight`
        # (a plain dict: a substituted tensor must not register as a parameter).
        self._substituted: dict[str, torch.Tensor] = {}
        self._watch = None
        if embedding is not None and getattr(embedding, "weight", None) is linear.weight:
            self._watch = embedding.register_forward_pre_hook(self._see_embedding)

    def stop_watching(self) -> None:
        """Remove the hook on the shared embedding: for a head of a task that never substitutes
        the embedding, served beside many others on one base (each hook would run in every pass
        of the base, and hold this head, for as long as the base lives)."""
        if self._watch is not None:
            self._watch.remove()
            self._watch = None

    def _see_embedding(self, module: nn.Module, args: Any) -> None:
        self._substituted.clear()
        if module.weight is not self.linear.weight:
            self._substituted["weight"] = module.weight

    def __getstate__(self) -> dict[str, Any]:
        # A substituted weight is a graph tensor (not deep-copyable); the next pass sees anew.
        return {**self.__dict__, "_substituted": {}}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        weight = self._substituted.get("weight")
        if weight is None:
            return self.linear(features)
        return nn.functional.linear(features, weight, self.linear.bias)

    def per_example_parameters(self, batch_size: int):
        """Nothing of the head trains, so it has no per-example leaves (DP's fast path)."""
        return contextlib.nullcontext({})


def prompt_length(labels: Sequence[int]) -> int:
    """Tokens before the first scored one: the prompt of a prompt/response row."""
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


@torch.no_grad()
def greedy_generate(
    task_model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    eos_token_id: int | None,
    pad_token_id: int,
    batch_size: int = 16,
    progress: bool = False,
) -> list[list[int]]:
    """Greedy continuations of token prompts through the task model (method attached or
    merged), without a key/value cache: every step re-runs the whole right-padded batch, so
    every method (prompts, substituted tensors) sees exactly the inputs it trains on. A
    continuation ends at EOS (not included) or after its `max_new_tokens`; `progress`: a bar
    over the batches."""
    limits = (
        [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    )
    positions = getattr(task_model.backbone.config, "max_position_embeddings", None)
    if positions:  # never past the position table
        limits = [min(n, positions - len(p)) for n, p in zip(limits, prompts, strict=True)]
    was_training = task_model.training
    task_model.eval()
    device = next(task_model.parameters()).device
    answers: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    starts = range(0, len(order), batch_size)
    for start in evaluation_batches(starts, len(order), batch_size, progress, "generate"):
        active = [i for i in order[start : start + batch_size] if limits[i] > 0]
        while active:
            rows = []
            for i in active:
                ids = list(prompts[i]) + answers[i]
                rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
            inputs = {k: v.to(device) for k, v in collate(rows, pad_token_id).items()}
            hidden = task_model.backbone_outputs(**inputs).last_hidden_state
            last = inputs["attention_mask"].sum(1) - 1
            features = hidden[torch.arange(len(rows), device=device), last]
            head = task_model.head
            next_ids = head(features.to(head.linear.weight.dtype)).argmax(-1).tolist()
            still = []
            for i, token in zip(active, next_ids, strict=True):
                if token == eos_token_id:
                    continue
                answers[i].append(token)
                if len(answers[i]) < limits[i]:
                    still.append(i)
            active = still
    task_model.train(was_training)
    return answers


def model_eos(model: nn.Module) -> int | None:
    """The EOS id of the task model's base config (the first, where it lists several)."""
    eos = getattr(model.backbone.config, "eos_token_id", None)
    return eos[0] if isinstance(eos, list) and eos else eos


def eos_id(tokenizer: Any) -> int:
    """The id that ends a response: the tokenizer's EOS (a decoder's pad token is often EOS)."""
    if tokenizer.eos_token_id is None:
        raise MicrotuneError(
            "this tokenizer has no EOS token, which ends every response; use a causal LM's "
            "tokenizer, or train on plain `text` rows"
        )
    return tokenizer.eos_token_id


class CausalLM(TaskType):
    """Next-token prediction with the base's LM head; per-token outputs over the vocabulary."""

    name = "causal-lm"
    per_token = True
    metrics = ("exact_match", "perplexity", "loss")
    stock_format = "causal-lm"
    stock_class = "AutoModelForCausalLM"
    auto_class = "AutoModelForCausalLM"
    # Dev rows the export check compares (at most): every row's logits span the vocabulary at
    # every token (16 rows of 256 tokens over SmolLM2's 49,152 are 0.8 GB of float32).
    export_check_examples = 16

    def backbone_and_head(self, model, head_config):
        """The decoder body and its LM head, once checked to give the model's own logits (a
        family that scales or caps its logits after the head is refused)."""
        body = getattr(model, getattr(model, "base_model_prefix", ""), None)
        linear = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if body is None or body is model or not isinstance(linear, nn.Linear):
            raise MicrotuneError(
                f"{type(model).__name__} is not a causal language model with an LM head; "
                "use a decoder (GPT-2, Llama, SmolLM2, ...)"
            )
        ids = torch.arange(8, device=linear.weight.device).view(1, 8) * 7 + 1
        ids = ids % model.config.vocab_size
        with torch.no_grad():
            expected = model(input_ids=ids).logits.float()
            got = linear(body(input_ids=ids).last_hidden_state).float()
        if not torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max()):
            raise MicrotuneError(
                f"{model.config.model_type}'s causal LM changes the LM head's logits (scaling or "
                "capping them); it is not supported for --task causal-lm"
            )
        return body, LMHead(linear, model.get_input_embeddings())

    def fit_rows(self, task, rows, text_columns):
        """prompt/response rows (exact match is the main metric) or text rows (perplexity);
        --text-columns maps the user's names: two columns are prompt, response; one is text."""
        columns = tuple(text_columns or ())
        if len(columns) not in (0, 1, 2):
            raise MicrotuneError(
                f"--text-columns {','.join(columns)}: causal-lm reads two columns (prompt, "
                "response) or one (text); name one or two"
            )
        first = rows[0] if rows else {}
        if not columns:
            columns = next(
                (c for c in (PAIR_COLUMNS, TEXT_COLUMNS) if all(k in first for k in c)), ()
            )
        if not columns:
            raise MicrotuneError(
                f"causal-lm data needs 'prompt' and 'response' columns (loss on the response) "
                f"or a 'text' column; found {sorted(first)}. Map yours with --text-columns "
                "prompt,response or --text-columns text"
            )
        metrics = (
            ("exact_match", "perplexity", "loss") if len(columns) == 2 else ("perplexity", "loss")
        )
        return dataclasses.replace(task, text_columns=columns, metrics=metrics)

    def read_example(self, task, row, columns, label_column, where):
        texts = [row[c] for c in columns]
        if not all(isinstance(t, str) for t in texts):
            raise MicrotuneError(f"{where}: columns {list(columns)} must hold text")
        if not texts[-1].strip():
            raise MicrotuneError(f"{where}: column '{columns[-1]}' is empty")
        return Example(tuple(texts), ())

    def readout(self, requested: str | None, default: str) -> str:
        if requested not in (None, "tokens"):
            raise MicrotuneError(
                f"--readout {requested}: a causal LM reads every token; leave it out"
            )
        return "tokens"

    def encode(self, tokenizer, examples, max_length, readout=""):
        """prompt (with the tokenizer's special tokens) + response + EOS, labels -100 on the
        prompt; or text, every token a label. Cut to max_length from the right."""
        if not examples:
            return [], []
        pairs = len(examples[0].texts) == 2
        firsts = tokenizer([e.texts[0] for e in examples], add_special_tokens=True).input_ids
        seconds = (
            tokenizer([e.texts[1] for e in examples], add_special_tokens=False).input_ids
            if pairs
            else None
        )
        eos = eos_id(tokenizer) if pairs else None
        rows, labels = [], []
        for index, first in enumerate(firsts):
            if pairs:
                answer = [*seconds[index], eos]
                ids = [*first, *answer][:max_length]
                label = ([IGNORE_INDEX] * len(first) + answer)[:max_length]
            else:
                ids = first[:max_length]
                label = list(ids)
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
            labels.append(label)
        _check_scored(labels, max_length)
        return rows, labels

    def loss(self, logits, labels, reduction="mean"):
        """Cross-entropy of each position's logits against the next token's label (float32);
        `reduction="none"`: each example's mean over its scored tokens."""
        logits, labels = logits[:, :-1], labels[:, 1:]
        flat = nn.functional.cross_entropy(
            logits.flatten(0, -2).float(),
            labels.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view(labels.shape)
        scored = (labels != IGNORE_INDEX).to(flat.dtype)
        if reduction == "none":
            return flat.sum(-1) / scored.sum(-1).clamp_min(1.0)
        return flat.sum() / scored.sum().clamp_min(1.0)

    def loss_units(self, labels: torch.Tensor) -> int:
        """The scored next-token positions: what `loss` averages over."""
        return int((labels[:, 1:] != IGNORE_INDEX).sum())

    def evaluate(
        self,
        model,
        task,
        rows,
        labels,
        pad_token_id,
        batch_size=64,
        tokenizer=None,
        *,
        progress=False,
        breakdown=False,
    ):
        sums, counts = token_losses(model, rows, labels, pad_token_id, batch_size, progress)
        tokens = sum(counts)
        loss = sum(sums) / max(tokens, 1)
        if not math.isfinite(loss):
            raise MicrotuneError(
                "the model's loss is not finite on the evaluation data, so nothing can be "
                "scored; check the artifact's tensors, or use a wider --dtype"
            )
        metrics: dict[str, float | None] = {"loss": loss, "perplexity": math.exp(min(loss, 700))}
        if len(task.text_columns) == 2:
            metrics["exact_match"] = exact_match(
                model, rows, labels, pad_token_id, batch_size, tokenizer, progress
            )
        return {key: metrics[key] for key in task.metrics if key in metrics}

    def score(self, task, outputs: Outputs, labels: Sequence):
        """Loss and perplexity of per-token logits as `predict` returns them (small models
        only: `evaluate` never holds the logits)."""
        total, tokens = 0.0, 0
        for logits, row in zip(outputs, labels, strict=True):
            row = torch.as_tensor(list(row[: len(logits)]))[None]
            scored = int((row[:, 1:] != IGNORE_INDEX).sum())
            total += float(self.loss(torch.as_tensor(logits)[None], row, "none")[0]) * scored
            tokens += scored
        loss = total / max(tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700))}

    def check_predicts(self) -> None:
        """Its outputs are a vocabulary per token: it generates instead."""
        raise MicrotuneError(
            "a causal-lm artifact generates text: use `microtune generate --artifact DIR "
            "--prompt TEXT` (or TunedModel.generate)"
        )

    def present(self, outputs: Outputs, label_names, examples, labels):
        self.check_predicts()
        return []

    def check_generates(self) -> None:
        """It generates."""

    def encode_prompts(self, tokenizer, prompts, max_length: int) -> list[list[int]]:
        """Prompts as generation reads them (`generate`, the server's decoder): with the
        tokenizer's special tokens, cut to `max_length`; an empty prompt refused."""
        encoded = tokenizer(list(prompts), add_special_tokens=True).input_ids
        encoded = [ids[:max_length] for ids in encoded]
        # An empty prompt: nothing to continue (and no token at all where no BOS is added)
        pairs = enumerate(zip(prompts, encoded, strict=True), 1)
        empty = next((n for n, (p, ids) in pairs if not (p.strip() and ids)), None)
        if empty is not None:
            raise MicrotuneError(f"prompt {empty} is empty; give some text to continue")
        return encoded

    def generate(self, task_model, tokenizer, prompts, max_new_tokens, batch_size, max_length):
        """Greedy continuations: each prompt encoded as in training (with the tokenizer's special
        tokens, cut to `max_length`), then up to `max_new_tokens` tokens until EOS. Merged or
        not, the tokens are the same (`greedy_generate`)."""
        encoded = self.encode_prompts(tokenizer, prompts, max_length)
        answers = greedy_generate(
            task_model,
            encoded,
            max_new_tokens,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            batch_size,
        )
        return [
            {"prompt": p, "response": tokenizer.decode(a, skip_special_tokens=True)}
            for p, a in zip(prompts, answers, strict=True)
        ]

    def export_stock(self, task_model, config: dict[str, Any], folder) -> bool:
        """The merged model as a stock `AutoModelForCausalLM` (`write_stock_causal_lm`)."""
        write_stock_causal_lm(task_model, folder)
        return True


@torch.no_grad()
def token_losses(
    model, rows, labels, pad_token_id: int, batch_size: int = 64, progress: bool = False
) -> tuple[list[float], list[int]]:
    """(summed loss, scored tokens) per row, as `loss` scores them, with the vocabulary-wide
    logits computed only at scored positions, a chunk at a time."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums, counts = [0.0] * len(rows), [0] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    start = 0
    every = batches(rows, labels, batch_size, pad_token_id, order)
    for inputs, batch_labels in evaluation_batches(every, len(rows), batch_size, progress):
        index = order[start : start + len(batch_labels)]
        start += len(batch_labels)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        hidden = model.backbone_outputs(**inputs).last_hidden_state[:, :-1]
        targets = batch_labels[:, 1:].to(device)
        where = targets != IGNORE_INDEX
        owner = torch.arange(len(index), device=device).unsqueeze(1).expand_as(targets)[where]
        features, wanted = hidden[where], targets[where]
        losses = torch.empty(len(wanted), device=device)
        for chunk in range(0, len(wanted), LOGIT_CHUNK):
            part = slice(chunk, chunk + LOGIT_CHUNK)
            logits = model.head(features[part].to(model.head.linear.weight.dtype)).float()
            losses[part] = nn.functional.cross_entropy(logits, wanted[part], reduction="none")
        per_row = torch.zeros(len(index), device=device).index_add_(0, owner, losses)
        per_count = torch.bincount(owner, minlength=len(index))
        for position, row in enumerate(index):
            sums[row] = float(per_row[position])
            counts[row] = int(per_count[position])
    model.train(was_training)
    return sums, counts


def exact_match(model, rows, labels, pad_token_id, batch_size, tokenizer, progress=False) -> float:
    """Share of rows whose greedy answer (up to EOS, at most the reference's length + 4
    tokens) equals the reference response, both decoded and stripped (token ids compared
    when no tokenizer is given)."""
    if not rows:
        return 0.0
    eos = eos_id(tokenizer) if tokenizer is not None else model_eos(model)
    prompts, references = [], []
    for row, label in zip(rows, labels, strict=True):
        cut = prompt_length(label)
        prompts.append(row["input_ids"][:cut])
        reference = list(label[cut:])
        references.append(reference[:-1] if reference[-1:] == [eos] else reference)
    budgets = [len(r) + EXTRA_ANSWER_TOKENS for r in references]
    answers = greedy_generate(
        model, prompts, budgets, eos, pad_token_id, batch_size, progress=progress
    )

    def text(ids: list[int]) -> str | list[int]:
        if tokenizer is None:
            return ids
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    hits = sum(text(a) == text(r) for a, r in zip(answers, references, strict=True))
    return hits / len(rows)


def _check_scored(labels: Sequence[Sequence[int]], max_length: int) -> None:
    """Refuse a split whose every example is cut to zero scored tokens (it trains on nothing
    and evaluates to a perfect score); warn with counts when only some are."""
    lost = sum(not any(label != IGNORE_INDEX for label in row[1:]) for row in labels)
    if lost == len(labels):
        raise MicrotuneError(
            f"every one of the {lost} examples has no scored token left at --max-length "
            f"{max_length} (prompts fill it); raise --max-length or shorten the prompts"
        )
    if lost:
        warnings.warn(
            f"{lost} of {len(labels)} examples lose every response token at --max-length "
            f"{max_length} (their prompts fill it) and add nothing to the loss",
            stacklevel=3,
        )


def write_stock_causal_lm(task_model: nn.Module, folder) -> None:
    """The merged model as a stock `AutoModelForCausalLM` (the LM head tied as in the base),
    checked to give the task model's logits on a probe batch; refused, never a fallback."""
    from transformers import AutoModelForCausalLM

    backbone = task_model.backbone
    stock_config = backbone.config.__class__.from_dict(backbone.config.to_dict())
    full = AutoModelForCausalLM.from_config(stock_config).to(backbone_dtype(backbone)).eval()
    getattr(full, full.base_model_prefix).load_state_dict(backbone.state_dict())
    head = full.get_output_embeddings()
    if head.weight is not full.get_input_embeddings().weight:  # untied: the base's own head
        head.load_state_dict(task_model.head.linear.state_dict())
    full.to(next(task_model.parameters()).device)
    inputs = probe_batch(task_model, "none")
    with torch.no_grad():
        got = full(**inputs).logits
    if not logits_match(got, task_logits(task_model, inputs), 1e-3):
        raise MicrotuneError(
            "the merged model does not reproduce the artifact's logits as a stock "
            "AutoModelForCausalLM; serve the artifact unmerged (`microtune generate`)"
        )
    full.save_pretrained(folder)
