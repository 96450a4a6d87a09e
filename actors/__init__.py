"""The long-lived actors of a run: scheduler, rollout, reward, trainer, param-sync.

Each actor is its own process (`asyncflow actor <role> --config C --nats URL`). Actors never import
each other: they meet only on NATS subjects and Flight keys. `actors.runtime` is the shared
plumbing (connection, heartbeats, the work loop), not an actor.
"""

ROLES = ("scheduler", "rollout", "reward", "trainer", "param_sync")
