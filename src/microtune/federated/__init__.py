"""Federated fine-tuning on Flower (`microtune federate`): a Flower `ClientApp` that trains one
party's rows with microtune's trainer and sends only the method's small state, a `ServerApp`
that aggregates with Flower's strategies (FedAvg, FedProx, FedAdam; client-level DP through
Flower's clipping wrappers, accounted with Opacus) and writes an ordinary microtune artifact.

Modules: `spec` (the plain-data settings both apps share), `partition` (Dirichlet label skew
through flwr-datasets), `exchange` (what travels per method, its checks and its bytes),
`client`, `server`, `simulation` (Flower's simulation engine on this machine).
"""
