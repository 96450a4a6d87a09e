"""RL algorithms: advantage estimators and policy losses (GRPO is the one built in)."""

from asyncflow.algorithms.grpo import group_advantages, grpo_loss

__all__ = ["group_advantages", "grpo_loss"]
