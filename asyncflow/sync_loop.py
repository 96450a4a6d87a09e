"""The synchronous reference: the same GRPO step with no actors, broker or store.

generate → reward → advantage → train, one phase after the other, in one process. It is the
yardstick for invariant I3 (a pipeline run with max_staleness 0 must reproduce it: same samples,
same losses) and a debugging mode that takes the distributed system out of the picture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoTokenizer

from asyncflow.algorithms.grpo import group_advantages, grpo_loss
from asyncflow.config import Config
from asyncflow.dataset import load_data, tokenize_prompt
from asyncflow.engines import SamplingParams, TrainBatch, make_inference_engine, make_training_engine
from asyncflow.hooks import load_callable
from asyncflow.partitions import group_sample_ids, prompt_index, sample_seed
from asyncflow.rewards import check_reward


@dataclass
class SyncStep:
    step: int
    rewards: dict[int, float] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    loss: float = 0.0
    grad_norm: float = 0.0


def run_synchronous(config: Config) -> tuple[list[SyncStep], dict[str, torch.Tensor]]:
    """Train `config.run.steps` steps synchronously; returns per-step records and the final weights."""
    algo = config.algorithm
    rows = load_data(config.data)
    tokenizer = AutoTokenizer.from_pretrained(str(config.model.path))
    reward_fn = load_callable(config.reward.function, "reward.function")
    generator = make_inference_engine(config.rollout.engine, config.model.path, config.model.dtype)
    trainer = make_training_engine(config.trainer.engine, config.model.path, temperature=config.sampling.temperature,
                                   dtype=config.model.dtype, seed=config.run.seed)
    params = SamplingParams(config.sampling.temperature, config.sampling.top_p, config.sampling.max_new_tokens)
    loss_fn = _loss(config)
    records = []
    for step in range(config.run.steps):
        record = SyncStep(step)
        groups = []
        for group in range(algo.prompts_per_step):
            row = rows[prompt_index(step, group, algo.prompts_per_step, len(rows), config.run.seed,
                                    config.data.shuffle)]
            groups.append((group_sample_ids(step, group, algo.prompts_per_step, algo.samples_per_prompt),
                           tokenize_prompt(tokenizer, row.prompt, config.data.chat_template,
                                           config.data.system_prompt), row))
        # Generation batches are composed exactly as rollout work items are (groups_per_item groups).
        responses = {}
        per_item = config.rollout.groups_per_item
        for first in range(0, len(groups), per_item):
            batch = groups[first:first + per_item]
            ids = [sid for sample_ids, _, _ in batch for sid in sample_ids]
            prompts = [prompt for sample_ids, prompt, _ in batch for _ in sample_ids]
            outputs = generator.generate(prompts, params, [sample_seed(config.run.seed, s) for s in ids])
            responses.update(zip(ids, outputs, strict=True))
        trained = 0
        stats_loss = 0.0
        for sample_ids, prompt, row in groups:
            for sid in sample_ids:
                text = tokenizer.decode(responses[sid].token_ids, skip_special_tokens=True)
                try:
                    record.rewards[sid] = check_reward(reward_fn(row.prompt, text, **row.fields))
                except Exception as error:
                    record.failed[sid] = f"{type(error).__name__}: {error}"
            live = [sid for sid in sample_ids if sid in record.rewards]
            if not live:
                continue
            advantages = group_advantages(np.array([record.rewards[s] for s in live]), scale=algo.scale_rewards,
                                          eps=algo.adv_eps)
            batch = TrainBatch(
                prompt_ids=[prompt] * len(live),
                response_ids=[responses[s].token_ids for s in live],
                behaviour_logprobs=[responses[s].logprobs for s in live],
                advantages=advantages.tolist(),
            )
            stats = trainer.forward_backward(batch, loss_fn)
            stats_loss += stats.get("loss_sum", 0.0)
            trained += len(live)
        if trained:
            record.grad_norm = trainer.optimizer_step(1.0 / trained)["grad_norm"]
        record.loss = stats_loss / max(trained, 1)
        generator.load_weights(trainer.export_weights())
        records.append(record)
    return records, dict(trainer.export_weights())


def _loss(config: Config):  # type: ignore[no-untyped-def]
    import functools

    algo = config.algorithm
    if algo.kl_coef > 0:
        raise NotImplementedError("the synchronous reference has no reference model; use kl_coef: 0")
    # The same correction as the trainer, so I3 compares one algorithm (here every sample is on-policy).
    return functools.partial(grpo_loss, clip_low=algo.clip_low, clip_high=algo.clip_high, kl_coef=0.0,
                             correction=algo.off_policy_correction, weight_cap=algo.importance_weight_cap)
