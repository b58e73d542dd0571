"""`microtune federate`: federated fine-tuning in Flower's simulation engine on this machine.

The options of the task, the method and local training are `microtune train`'s (generated from
the same config dataclasses); the federation's own are below. The same apps run under Flower's
deployment engine (docs/guides/federated.md, examples/flower)."""

from __future__ import annotations

import argparse
from typing import Any

from microtune.cli import options
from microtune.cli.common import HelpFormatter, add_data_options
from microtune.errors import MicrotuneError
from microtune.federated.spec import SCHEDULES, STRATEGIES
from microtune.methods import method_names
from microtune.tasks.spec import TASKS


def add(commands) -> None:
    parser = commands.add_parser(
        "federate",
        help="federated fine-tuning: a Flower simulation over a non-IID split of the task",
        formatter_class=HelpFormatter,
        description="Split the task's training rows over --clients parties (Dirichlet label "
        "skew, concentration --alpha), run --rounds rounds of Flower's simulation engine in "
        "which --clients-per-round parties train --local-steps steps each and send only the "
        "method's small state, aggregate with Flower's strategy, evaluate the global model on "
        "the dev set each round. --output gets an ordinary artifact (eval, merge, export, serve "
        "work on it), metrics.json and train_log.jsonl (one line per round).",
        # --alpha is the Dirichlet concentration here (LoRA's alpha keeps its default).
        conflict_handler="resolve",
    )
    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="task")
    parser.add_argument("--method", default="slash", choices=method_names(), help="method")
    parser.add_argument("--output", required=True, help="artifact folder to write")
    parser.add_argument("--model", default=None, help="base model (default: the packaged one)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example")
    parser.add_argument("--resume", action="store_true", help="continue from the last round")
    parser.add_argument("--overwrite", action="store_true", help="start over in --output")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's log")
    options.add_train_config_options(parser)
    add_data_options(parser, training=True)
    options.add_method_options(parser)
    options.add_dp_options(parser)
    _add_federation_options(parser)


def _add_federation_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("federation")
    group.add_argument("--clients", type=int, default=10, help="parties the rows are split over")
    group.add_argument("--clients-per-round", type=int, default=3, help="parties per round")
    group.add_argument("--rounds", type=int, default=20, help="federated rounds")
    group.add_argument(
        "--local-steps", type=int, default=50, help="optimizer steps each party runs per round"
    )
    group.add_argument(
        "--alpha",
        dest="dirichlet_alpha",
        type=float,
        default=1.0,
        help="Dirichlet concentration of the label skew (0.1: most parties see mostly one "
        "label; 100: close to IID)",
    )
    group.add_argument("--partition-seed", type=int, default=0, help="seed of the split")
    group.add_argument("--strategy", choices=STRATEGIES, default="fedavg", help="Flower strategy")
    group.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="federation",
        help="learning rate: federation = one warmup and --lr-schedule decay over rounds x "
        "local steps, as centralised training of that many steps; round = restarted every round",
    )
    group.add_argument("--proximal-mu", type=float, default=0.01, help="FedProx's mu")
    group.add_argument(
        "--logit-adjustment",
        type=float,
        default=1.0,
        help="classification: each party trains on logits + tau x log of its own label "
        "frequencies (logit adjustment against label skew; 0: off, the plain loss)",
    )
    group.add_argument("--server-lr", type=float, default=0.1, help="FedAdam's server rate eta")
    group.add_argument(
        "--lora-frozen-a",
        action="store_true",
        help="LoRA: keep every A at its seeded start, send only B (then averaging is exact)",
    )
    group.add_argument("--workers", type=int, default=1, help="parties trained at once (CPUs)")
    _add_round_options(parser)
    _add_client_dp_options(parser)


def _add_round_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("rounds that go wrong")
    group.add_argument(
        "--min-replies", type=int, default=1, help="fewer valid replies: the round is skipped"
    )
    group.add_argument(
        "--round-timeout", type=float, default=600.0, help="seconds a round waits for replies"
    )
    group.add_argument(
        "--allow-empty-rounds",
        action="store_true",
        help="go on when a round aggregates no update (none of --min-replies valid replies "
        "within --round-timeout); without it such a round stops the federation with an error",
    )


def _add_client_dp_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("client-level differential privacy")
    group.add_argument(
        "--client-dp-epsilon",
        type=float,
        default=None,
        help="client-level DP: target epsilon over the rounds (noise calibrated with Opacus' "
        "accountant at sampling rate clients-per-round / clients)",
    )
    group.add_argument("--client-dp-delta", type=float, default=1e-5, help="client-level delta")
    group.add_argument(
        "--client-dp-clip", type=float, default=1.0, help="L2 bound on one party's update"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from microtune.common.choices import DEFAULT_MODEL
    from microtune.federated.simulation import simulate
    from microtune.federated.spec import ClientDP, FederationSpec

    if args.max_steps is not None or args.epochs is not None:
        raise MicrotuneError("federate trains --local-steps per round; drop --max-steps/--epochs")
    if args.workers < 1:
        raise MicrotuneError(f"--workers must be at least 1, got {args.workers}")
    args.max_steps = args.local_steps
    client_dp = None
    if args.client_dp_epsilon is not None:
        client_dp = ClientDP(args.client_dp_epsilon, args.client_dp_delta, args.client_dp_clip)
    spec = FederationSpec(
        task=args.task,
        method=args.method,
        output_dir=args.output,
        train_config=options.train_config(args),
        model=args.model or DEFAULT_MODEL,
        method_options=options.method_options(args),
        data=options.data_source(args),
        max_length=args.max_length,
        clients=args.clients,
        clients_per_round=args.clients_per_round,
        rounds=args.rounds,
        alpha=args.dirichlet_alpha,
        partition_seed=args.partition_seed,
        strategy=args.strategy,
        schedule=args.schedule,
        proximal_mu=args.proximal_mu,
        logit_adjustment=args.logit_adjustment,
        server_lr=args.server_lr,
        min_replies=args.min_replies,
        round_timeout=args.round_timeout,
        allow_empty_rounds=args.allow_empty_rounds,
        lora_frozen_a=args.lora_frozen_a,
        client_dp=client_dp,
        sample_dp=options.dp_config(args),
        resume=args.resume,
        overwrite=args.overwrite,
    )
    return simulate(spec, workers=args.workers, verbose=args.verbose)
