"""TRL's GRPOTrainer on the same run as an AsyncFlow config: the peer users would pick instead.

Benchmark-only (install extra `bench`). It reads an AsyncFlow run config (default
`examples/smollm2.yaml`, `--set field=value` overrides as in `asyncflow run`) and trains the same
model on the same task with `trl.GRPOTrainer`, with every setting the two share taken from that
config:

| what | AsyncFlow (config) | here (GRPOConfig) |
|---|---|---|
| model, dtype | `model.path`, float32 | the same folder, float32 (`bf16=False`), loaded from disk only |
| prompts | `prompt_index(partition, group, …)`: epochs over the dataset in a seeded order | the same rows in the same order: one dataset row per (step, group), `shuffle_dataset=False` |
| prompt text | `tokenize_prompt` (chat template + system prompt) | conversational prompts through the same template (token ids of the first prompt checked equal at start-up) |
| group size, prompts per step | `samples_per_prompt`, `prompts_per_step` | `num_generations`; 8 prompts × 4 = 32 samples per optimizer step |
| one optimizer step per generation batch | yes | `per_device_train_batch_size` = `micro_batch_size`, gradient accumulation over the rest of the 32, `num_iterations=1` |
| sampling | temperature, top_p, max_new_tokens | `temperature`, `top_p`, `top_k=0`, `max_completion_length` |
| optimizer | AdamW(lr, betas, weight_decay), eps 1e-8, clip grad norm, constant lr | `optim="adamw_torch"`, the same values, `lr_scheduler_type="constant"`, no warm-up |
| loss | PPO clip (clip_low / clip_high), sequence mean per sample, sum / samples of the step | `loss_type="grpo"`, `epsilon` / `epsilon_high`: sequence mean per sample, mean over the micro-batch / accumulation steps = mean over the 32 |
| KL | `kl_coef` (0) | `beta` (0: no reference model) |
| reward | `module:function(prompt, response, **row)` | the same function, called per sample with the raw prompt and the decoded reply |
| seed | `run.seed` | `seed` (the Trainer seeds torch; sampling draws from torch's global generator) |

What cannot be made the same, and why:

- **Generation engine.** AsyncFlow generates with vLLM (CPU build) in its rollout actor; this
  runs TRL's default, `model.generate` from transformers on the training model (`use_vllm=False`).
  TRL's vLLM colocate mode does not work on this CPU setup. TRL 1.16 supports vLLM 0.22–0.31 (its
  `vllm` extra pins `vllm<=0.31`, and it warns about the 0.32 here, which transformers 5.19 needs).
  Tried with `use_vllm=True, vllm_mode="colocate"` on SmolLM2: vLLM starts (external launcher,
  CPU), but TRL's first weight sync, which calls the vLLM model's `load_weights` once per
  parameter, fails with `AttributeError: 'Parameter' object has no attribute 'weight_loader'`
  (vLLM's CPU layers re-pack their weights after loading, so they cannot be loaded into again
  that way; AsyncFlow's vLLM adapter handles that re-pack itself). Server mode needs a second,
  separately launched `trl vllm-serve` process and an NCCL weight-update group (CUDA only).
  So TRL on CPU generates with HF transformers, which is what a TRL user on this machine gets.
- **Random draws.** AsyncFlow seeds every sample from (run seed, sample id) inside vLLM; TRL
  samples a whole generation batch from torch's global generator. Same seed, different samples.
- **Advantage scale.** TRL divides by the group's *sample* standard deviation (Bessel's
  correction) + 1e-4; AsyncFlow by the population one + 1e-6. With groups of 4 every TRL advantage
  is √(3/4) ≈ 0.87 × AsyncFlow's. AdamW's update does not change with a constant gradient scale
  (up to its eps); only steps where the gradient-norm clip at 1.0 engages in one and not the other
  differ.
- **Importance ratio.** TRL with `num_iterations=1` and one optimizer step per generation batch uses
  the training model's own detached logprobs as the old policy, so the ratio is exactly 1. AsyncFlow
  takes the ratio against the logprobs vLLM recorded (≈ 1 at k = 0, a stale policy's at k ≥ 1) and
  clips it at 1 ± 0.2. The gradient at ratio 1 is the same.
- **Threads.** AsyncFlow runs several processes (rollout, trainer, …) with `run.torch_threads` (1)
  torch threads each. TRL is one process that generates and trains in turn, so it gets all the
  machine's cores (`--threads`, default `os.cpu_count()`: 2 here).

Output (in `--output-dir`): `metrics.jsonl`, one line per optimizer step with `step` (0-based),
`time_s` (since this script started, before the heavy imports), `step_s`, `samples`,
`reward_mean`, `tokens` (completion tokens, EOS included: the count AsyncFlow's `metrics.jsonl`
reports as `tokens`), `failed_samples`, `loss`, `grad_norm`; `summary.json` in AsyncFlow's format
(`asyncflow.monitor.summarize`); `run.json` with the settings used; `final/` with the trained model
(AsyncFlow saves one too, so both runs do the same work).

Run: ``python -m bench.trl_grpo [--config examples/smollm2.yaml] [--output-dir runs/trl-grpo]
[--set run.steps=2] [--threads N]``
"""

from __future__ import annotations

import time

STARTED = time.time()  # before the heavy imports, like the launcher's clock before it starts actors

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

# Nothing may come from the Hub: every model and tokenizer is a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from asyncflow.config import Config, load_config, parse_override  # noqa: E402
from asyncflow.dataset import PromptRow, load_prompts, tokenize_prompt  # noqa: E402
from asyncflow.hooks import load_callable  # noqa: E402
from asyncflow.monitor import summarize  # noqa: E402
from asyncflow.partitions import prompt_index  # noqa: E402

DEFAULT_CONFIG = Path("examples/smollm2.yaml")
DEFAULT_OUTPUT = Path("runs/trl-grpo")
RAW_PROMPT = "_raw_prompt"  # dataset column holding the prompt text the reward function gets


def run_prompts(config: Config, rows: list[PromptRow]) -> list[PromptRow]:
    """The dataset rows in the order AsyncFlow uses them: step s, group g → row `prompt_index(s, g)`."""
    algo, data = config.algorithm, config.data
    return [rows[prompt_index(step, group, algo.prompts_per_step, len(rows), config.run.seed, data.shuffle)]
            for step in range(config.run.steps) for group in range(algo.prompts_per_step)]


def prompt_messages(config: Config, text: str) -> list[dict[str, str]] | str:
    """A TRL prompt: a conversation when the config uses the chat template, else the plain text."""
    if not config.data.chat_template:
        return text
    messages = [{"role": "system", "content": config.data.system_prompt}] if config.data.system_prompt else []
    return [*messages, {"role": "user", "content": text}]


def trl_prompt_ids(tokenizer: Any, prompt: list[dict[str, str]] | str) -> list[int]:
    """Token ids of one prompt, computed the way GRPOTrainer._tokenize_prompts does."""
    if isinstance(prompt, str):
        return list(tokenizer(text=[prompt])["input_ids"][0])
    out = tokenizer.apply_chat_template(conversation=[prompt], add_generation_prompt=True, tokenize=True,
                                        return_dict=True)
    return list(out["input_ids"][0])


class StepRecorder:
    """Wraps the user's reward function for TRL and turns each optimizer step into a metrics line.

    TRL calls the reward once per generation batch, i.e. once per optimizer step here, with every
    completion's token ids, so rewards and completion-token counts are taken there; the line is
    written when the step's log arrives (it carries loss and grad norm), timed at the step's end.
    """

    def __init__(self, reward: Callable[..., float], fields: Sequence[str], path: Path) -> None:
        self.reward = reward
        self.fields = list(fields)
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self._batch: dict[str, Any] | None = None
        self._pending: dict[str, Any] | None = None
        self._last_end = STARTED
        self.__name__ = getattr(reward, "__name__", "reward")  # TRL names metrics after the function

    def __call__(self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
                 **columns: Any) -> list[float | None]:
        rewards: list[float | None] = []
        for i, completion in enumerate(completions):
            text = completion[-1]["content"] if isinstance(completion, list) else completion
            row = {name: columns[name][i] for name in self.fields}
            try:
                rewards.append(float(self.reward(columns[RAW_PROMPT][i], text, **row)))
            except Exception:  # AsyncFlow fails such a sample; TRL's equivalent is None (not trained)
                rewards.append(None)
        present = [r for r in rewards if r is not None]
        self._batch = {
            "samples": len(rewards),
            "failed_samples": len(rewards) - len(present),
            "reward_mean": sum(present) / len(present) if present else None,
            "tokens": sum(len(ids) for ids in completion_ids),
        }
        return rewards

    def step_end(self, step: int) -> None:
        now = time.time()
        batch = self._batch or {"samples": 0, "failed_samples": 0, "reward_mean": None, "tokens": 0}
        self._pending = {"step": step, "time_s": round(now - STARTED, 3), "step_s": round(now - self._last_end, 3),
                         **batch, "loss": None, "grad_norm": None, "staleness_max": 0}
        self._last_end = now
        self._batch = None

    def log(self, logs: dict[str, float]) -> None:
        if self._pending is None or "loss" not in logs:
            return
        self._pending["loss"] = logs.get("loss")
        self._pending["grad_norm"] = logs.get("grad_norm")
        self.flush()

    def flush(self) -> None:
        if self._pending is None:
            return
        self.rows.append(self._pending)
        with self.path.open("a") as handle:
            handle.write(json.dumps(self._pending) + "\n")
        line = self._pending
        reward = "n/a" if line["reward_mean"] is None else f"{line['reward_mean']:.3f}"
        print(f"trl step {line['step'] + 1}  reward {reward}  tokens {line['tokens']}  "
              f"step {line['step_s']:.1f}s  t {line['time_s']:.1f}s", flush=True)
        self._pending = None


def grpo_args(config: Config, output_dir: Path) -> Any:
    """GRPOConfig with every shared setting taken from the AsyncFlow config (see the module docstring)."""
    from trl import GRPOConfig

    algo, engine, sampling = config.algorithm, config.trainer.engine, config.sampling
    samples = config.samples_per_step
    micro = min(engine.micro_batch_size, samples)
    if samples % micro:
        raise ValueError(f"micro_batch_size {micro} must divide the {samples} samples of a step")
    return GRPOConfig(
        output_dir=str(output_dir),
        seed=config.run.seed,
        use_cpu=engine.device == "cpu",
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,  # AsyncFlow's trainer does not checkpoint
        max_steps=config.run.steps,
        # One generation batch of prompts_per_step × samples_per_prompt per optimizer step, trained in
        # micro-batches of micro_batch_size sequences with gradient accumulation, used once.
        num_generations=algo.samples_per_prompt,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=samples // micro,
        num_iterations=1,
        shuffle_dataset=False,  # the dataset is already in AsyncFlow's order
        remove_unused_columns=False,
        max_completion_length=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=0,
        repetition_penalty=1.0,
        use_vllm=False,
        learning_rate=engine.lr,
        adam_beta1=engine.betas[0],
        adam_beta2=engine.betas[1],
        adam_epsilon=1e-8,  # torch.optim.AdamW's default, which AsyncFlow uses
        weight_decay=engine.weight_decay,
        max_grad_norm=engine.grad_clip,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        warmup_steps=0,
        beta=algo.kl_coef,
        epsilon=algo.clip_low,
        epsilon_high=algo.clip_high,
        loss_type="grpo",
        scale_rewards="group" if algo.scale_rewards else "none",
        mask_truncated_completions=False,  # AsyncFlow trains truncated replies too
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def train(config: Config, output_dir: Path, threads: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    torch.set_num_threads(threads)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "summary.json", "run.json"):
        (output_dir / name).unlink(missing_ok=True)

    from asyncflow.launcher import prepare_inputs

    prepare_inputs(config)  # builds the model / dataset folders if the config says how (locally)
    rows = load_prompts(config.data.path, config.data.prompt_field)
    ordered = run_prompts(config, rows)
    fields = sorted({key for row in rows for key in row.fields})
    records = [{"prompt": prompt_messages(config, row.prompt), RAW_PROMPT: row.prompt,
                **{name: row.fields.get(name) for name in fields}} for row in ordered]
    dataset = Dataset.from_list(records)

    model_path = str(config.model.path)
    dtype = torch.float32 if config.model.dtype == "float32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    # The prompt tokens must be the ones AsyncFlow's rollout sees; check the first prompt.
    ours = tokenize_prompt(tokenizer, ordered[0].prompt, config.data.chat_template, config.data.system_prompt)
    theirs = trl_prompt_ids(tokenizer, records[0]["prompt"])
    prompts_match = ours == theirs
    if not prompts_match:
        print(f"warning: TRL's prompt tokens differ from AsyncFlow's:\n  asyncflow {ours}\n  trl       {theirs}",
              file=sys.stderr, flush=True)

    recorder = StepRecorder(load_callable(config.reward.function, "reward.function"), fields,
                            output_dir / "metrics.jsonl")

    class Steps(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            recorder.step_end(state.global_step - 1)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
                   **kwargs: Any) -> None:
            recorder.log(logs or {})

    args = grpo_args(config, output_dir)
    trainer = GRPOTrainer(model=model, reward_funcs=recorder, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Steps()])
    train_started = time.time()
    trainer.train()
    recorder.flush()
    train_s = time.time() - train_started
    if config.trainer.save_final:
        trainer.save_model(str(output_dir / "final"))
    wall_s = time.time() - STARTED

    import transformers
    import trl

    summary = summarize(recorder.rows, wall_s)
    summary.update({
        "started_at": round(STARTED, 3),  # the zero of `time_s`, as AsyncFlow's summary gives it
        "tokens": sum(r["tokens"] for r in recorder.rows),
        "train_s": round(train_s, 3),
    })
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    info = {
        "config": config.model_dump(mode="json"),
        "grpo_config": {k: v for k, v in args.to_dict().items() if isinstance(v, (int, float, str, bool, type(None)))},
        "threads": threads,
        "prompts_match_asyncflow": prompts_match,
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__, "python": platform.python_version()},
    }
    (output_dir / "run.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    print(json.dumps(summary), flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="AsyncFlow run config to mirror")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, as `asyncflow run --set` (repeatable)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads: TRL is one process, so it gets every core (default: all)")
    args = parser.parse_args(argv)
    config = load_config(args.config, dict(parse_override(text) for text in args.set))
    train(config, args.output_dir, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
