"""The CISPO trainer (MiniMax-M1 §3): rollouts → rewards → group advantages → π_old → μ minibatch updates.

One step t:
1. Rollouts: `num_prompts` prompts × G samples with the generation engine at the current parameters θ_t
   (temperature/top-p from the config, repetition early stop, per-sample seeds (seed, t, prompt, sample)); with
   `rollout.mesh`, θ_t is cast and resharded into the rollout layout by one jitted copy each step.
   With dynamic sampling, groups whose rewards are all equal are dropped and more prompts are sampled (up to
   `max_rounds` generation rounds of the same shape); slots still empty are filled with masked-out rows.
2. Rewards R_i = Σ_k w_k f_k (+ DAPO overlong penalty); the `shuffle_rewards` control permutes them in the batch.
3. A_i = (R_i − mean_g R) / (std_g R + ε)        (`m1jax.train.advantages.group_advantages`)
4. π_old: `sequence_logprobs` at θ_t (fp32 head) — the same function the loss uses; compared with the sampler's
   log-probs (the mismatch meter `probability_agreement`: correlations of p and of log p, mean |Δ log p| and its
   per-sequence max). With `cispo.routing_replay` the engine records every token's routed experts and the π_old
   and update forwards replay them.
5. μ = `num_minibatches` off-policy updates per epoch: the prompt groups are shuffled and split into μ
   minibatches; each is one AdamW step on the CISPO loss with the denominators D_b of that optimizer step
   (`token_normalizer`), accumulated over `micro_batches` (sums).

Several processes (`m1jax.train.distributed`): each process draws its share of the prompts and scores their
completions; the rewards are all-gathered, so steps 2-3 (advantages, control, dynamic sampling) are the
one-process computation on every process; the step's batch is placed once, each process feeding the rows its
devices hold, and π_old chunks and minibatches are cut from it on device. The mismatch meter and the entropy
metric read the step's log-probs on every host (`generation.to_host`: an all-gather of N × L floats).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from m1jax.train.advantages import group_advantages, zero_std_groups
from m1jax.train.data_sources import JsonlPrompts, Reverse3Prompts
from m1jax.train.distributed import allgather_host, allgather_ragged, share_slice
from m1jax.train.logprobs import probability_agreement
from m1jax.train.loop import TrainLoop, as_batch, local_rows, rows_per_chunk, select_rows, take_rows, to_host
from m1jax.train.losses import token_normalizer
from m1jax.train.reward_stage import build_reward_set, overlong_penalty, score_rollouts, shuffle_within_batch
from m1jax.train.rollout import pack_rollouts, prompt_width, sample_groups
from m1jax.train.run_config import RunConfig, RunConfigError
from m1jax.train.update import LossSpec, cast_params, forward_logprobs, update_step

from m1jax.generation import Engine
from m1jax.generation import to_host as array_to_host
from m1jax.loading import param_shardings
from m1jax.sampling import SamplingParams
from m1jax.sharding import make_mesh


def make_prompt_source(cfg: RunConfig, tokenizer):
    if cfg.task.name == "reverse3":
        return Reverse3Prompts(cfg.seed)
    return JsonlPrompts(cfg.task.path, tokenizer, cfg.seed, prompt_field=cfg.task.prompt_field)


@functools.partial(jax.jit, static_argnames=("mesh", "normalization", "num_groups"))
def gather_minibatch(step_batch: dict, rows_B, group_ids_B, *, mesh, normalization: str, num_groups: int) -> dict:
    """Rows `rows_B` of the step's (device) batch, laid out as a batch over `mesh`, with the loss denominators
    D_b of that optimizer step (`token_normalizer` over its groups `group_ids_B` in [0, num_groups))."""
    mb = select_rows(step_batch, rows_B, mesh)
    mb["denom_B"] = token_normalizer(mb["mask_BxL"], group_ids_B, normalization=normalization, num_groups=num_groups)
    return mb


class CISPOTrainer(TrainLoop):
    """`CISPOTrainer(cfg).run()`; see the module docstring for one step."""

    def __init__(self, cfg: RunConfig, **kw):
        super().__init__(cfg, **kw)
        self.data = make_prompt_source(cfg, self.tokenizer)
        vocab = getattr(self.data, "vocab_size", None)
        if vocab is not None and self.model.config.vocab_size < vocab:
            raise RunConfigError(f"run config field 'model': vocab_size {self.model.config.vocab_size} is smaller "
                                 f"than task {cfg.task.name!r}'s vocabulary ({vocab} tokens)")
        self.reward_set = build_reward_set(cfg.rewards)
        c = cfg.cispo
        self.loss_spec = LossSpec(kind=c.loss, eps_low=c.eps_low, eps_high=c.eps_high, masked=c.masked,
                                  max_log_ratio=c.max_log_ratio, aux_loss_coef=c.router_aux_loss_coef,
                                  entropy_bonus=c.entropy_coef > 0, seq_chunk=cfg.model.logprob_seq_chunk,
                                  vocab_chunk=cfg.model.logprob_vocab_chunk)
        r = cfg.rollout
        self.sampling = SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, min_p=r.min_p,
                                       max_new_tokens=r.max_new_tokens, stop_token_ids=self.data.stop_token_ids,
                                       repetition_stop=r.repetition_stop,
                                       repetition_threshold=r.repetition_threshold)
        if r.num_prompts % jax.process_count():
            raise RunConfigError(f"run config field 'rollout.num_prompts': {r.num_prompts} prompts cannot be shared "
                                 f"equally by {jax.process_count()} processes")
        self.groups_per_minibatch = r.num_prompts // c.num_minibatches
        self.rows_per_micro = self.groups_per_minibatch * r.group_size // c.micro_batches
        self.rollout_mesh = None
        if r.mesh:
            try:
                self.rollout_mesh = make_mesh(dict(r.mesh))
            except ValueError as e:
                raise RunConfigError(f"run config field 'rollout.mesh': {e}") from None
        self._to_rollout_layout = None

    # ------------------------------------------------------------------------------------------ rollouts
    def rollout_model(self):
        """The model the engine samples from: θ_t in the compute dtypes (LoRA: merged), laid out on the rollout
        mesh if there is one (a jitted cast with `out_shardings`: one copy, made directly in that layout)."""
        m = self.model
        if self.rollout_mesh is None:
            return m.inference_model(self.params)
        if m.frozen is not None:  # LoRA: the merged model, moved into the rollout layout
            graphdef, state = nnx.split(m.inference_model(self.params))
            return nnx.merge(graphdef, jax.device_put(state, param_shardings(state, self.rollout_mesh)))
        if self._to_rollout_layout is None:
            shardings = param_shardings(self.params, self.rollout_mesh)
            self._to_rollout_layout = jax.jit(functools.partial(cast_params, param_dtypes=m.param_dtypes),
                                              out_shardings=shardings)
        return nnx.merge(m.graphdef, self._to_rollout_layout(self.params))

    def _generate_round(self, step: int, round_index: int) -> dict:
        """One generation round: this process's share of the prompts, every sample (the engine is SPMD), rewards
        of this process's samples all-gathered (after the control), advantages. Arrays are of the whole round."""
        r, g = self.cfg.rollout, self.cfg.rollout.group_size
        share = share_slice(r.num_prompts, jax.process_index(), jax.process_count())
        prompts = self.data.next_batch(r.num_prompts, share)
        prompt_ids = allgather_ragged([p.ids for p in prompts])
        engine = Engine(self.rollout_model(), self.tokenizer, prefill_chunk=r.prefill_chunk,
                        mesh=self.rollout_mesh if self.rollout_mesh is not None else self.mesh)
        t0 = time.perf_counter()
        results = sample_groups(engine, prompt_ids, g, self.sampling, run_seed=self.cfg.seed, step=step,
                                first_prompt_index=round_index * r.num_prompts,
                                return_routed_experts=self.cfg.cispo.routing_replay)
        t_gen = time.perf_counter() - t0
        own = results[share.start * g:share.stop * g]  # the completions of this process's prompts
        rows = [prompts[i // g] for i in range(len(own))]
        completion_ids = [res.tokens for res in own]
        scores = score_rollouts(self.reward_set, [p.text for p in rows],
                                [self.data.decode(c) for c in completion_ids], [p.ids for p in rows], completion_ids,
                                [res.finish_reason for res in own], [p.fields for p in rows],
                                workers=self.cfg.rewards.workers)
        t_reward = time.perf_counter() - t0 - t_gen
        rewards = allgather_host(np.asarray(scores.total, np.float64))
        per_function = {k: allgather_host(np.asarray(v, np.float64)) for k, v in scores.per_function.items()}
        lengths = np.array([len(res.tokens) for res in results])
        if r.overlong is not None:
            penalty = overlong_penalty(lengths, r.max_new_tokens, r.overlong.cache_tokens, r.overlong.penalty)
            per_function["overlong_penalty"] = penalty
            rewards = rewards + penalty
        true_rewards = rewards
        if self.cfg.control == "shuffle_rewards":
            rewards = shuffle_within_batch(rewards, self.rng)
        group_ids = np.repeat(np.arange(r.num_prompts), g)
        adv, info = group_advantages(rewards, group_ids, std=self.cfg.cispo.advantage_std)
        _, zero_G = zero_std_groups(rewards, group_ids)
        return {"prompt_ids": prompt_ids, "results": results, "rewards": true_rewards, "adv": adv, "info": info,
                "zero_G": zero_G, "per_function": per_function, "lengths": lengths, "time_gen": t_gen,
                "time_reward": t_reward}

    def _select_groups(self, rounds: list[dict]) -> tuple[dict, int]:
        """The step's batch (device arrays of N = num_prompts·G rows, each process packing and placing only the
        rows it holds): with dynamic sampling the first `num_prompts` groups with non-equal rewards over the
        rounds, topped up with masked-out zero-advantage groups; without it, round 0 as is."""
        r, g = self.cfg.rollout, self.cfg.rollout.group_size
        picks, fillers = [], []
        for k, rd in enumerate(rounds):
            for grp in range(r.num_prompts):
                if r.dynamic_sampling_rounds and rd["zero_G"][grp]:
                    fillers.append((k, grp))
                else:
                    picks.append((k, grp))
        kept = picks[:r.num_prompts]
        chosen = kept + fillers[:r.num_prompts - len(kept)]
        keep = np.array([1.0] * len(kept) + [0.0] * (len(chosen) - len(kept)), np.float32)
        n_rows = len(chosen) * g
        mine = local_rows(n_rows, self.mesh)
        source = [(chosen[i // g][0], chosen[i // g][1] * g + i % g) for i in mine]  # (round, row of the round)
        width = prompt_width([len(ids) for rd in rounds for ids in rd["prompt_ids"]],
                             getattr(self.data, "prompt_len", None))
        packed = pack_rollouts([rounds[k]["prompt_ids"][i // g] for k, i in source],
                               [rounds[k]["results"][i] for k, i in source], width, r.max_new_tokens)
        keep_rows = keep[mine // g]
        batch = {"tokens_NxL": packed.tokens_NxL, "valid_NxL": packed.valid_NxL,
                 "mask_NxL": packed.mask_NxL * keep_rows[:, None], "sampler_logp_NxL": packed.sampler_logp_NxL,
                 "adv_N": np.array([rounds[k]["adv"][i] for k, i in source], np.float32) * keep_rows}
        if self.cfg.cispo.routing_replay:
            batch["routed_experts_NxLxNxK"] = packed.routed_experts_NxLxNxK
        return as_batch(batch, self.mesh, n_rows), len(kept)

    # ------------------------------------------------------------------------------------------ step
    def train_step(self, step: int) -> dict:
        cfg, r, c = self.cfg, self.cfg.rollout, self.cfg.cispo
        t_start = time.perf_counter()
        rounds = [self._generate_round(step, 0)]
        while (r.dynamic_sampling_rounds and len(rounds) < r.dynamic_sampling_rounds
               and sum(int(np.sum(~rd["zero_G"])) for rd in rounds) < r.num_prompts):
            rounds.append(self._generate_round(step, len(rounds)))
        batch, kept_groups = self._select_groups(rounds)
        t_rollout = time.perf_counter() - t_start

        # π_old and entropy at the rollout parameters, in micro-batch-sized chunks (the update's shapes).
        t0 = time.perf_counter()
        n_rows = batch["tokens_NxL"].shape[0]
        old_logp, entropy = [], []
        replay = batch.get("routed_experts_NxLxNxK")
        inputs = {k: batch[k] for k in ("tokens_NxL", "valid_NxL", "routed_experts_NxLxNxK") if k in batch}
        for sl in rows_per_chunk(n_rows, self.rows_per_micro):
            dev = take_rows(inputs, np.arange(sl.start, sl.stop, dtype=np.int32), self.mesh)
            lp, ent = forward_logprobs(self.params, dev["tokens_NxL"], dev["valid_NxL"], self.model.frozen,
                                       routed_experts_BxLxNxK=dev.get("routed_experts_NxLxNxK"),
                                       graphdef=self.model.graphdef, param_dtypes=self.model.param_dtypes,
                                       seq_chunk=self.loss_spec.seq_chunk, vocab_chunk=self.loss_spec.vocab_chunk)
            old_logp.append(lp)
            entropy.append(ent)
        old_logp_NxL = jnp.concatenate(old_logp) if len(old_logp) > 1 else old_logp[0]
        host = {k: array_to_host(v) for k, v in (("sampler_logp_NxL", batch["sampler_logp_NxL"]),
                                                 ("old_logp_NxL", old_logp_NxL), ("mask_NxL", batch["mask_NxL"]),
                                                 ("entropy_NxL", jnp.concatenate(entropy)))}
        host["valid_tokens"] = int(array_to_host(jnp.sum(batch["valid_NxL"])))
        agreement = probability_agreement(host["sampler_logp_NxL"], host["old_logp_NxL"], host["mask_NxL"])

        # μ minibatch updates per epoch over shuffled prompt groups, cut from the step's batch on device.
        step_batch = {"tokens_BxL": batch["tokens_NxL"], "valid_BxL": batch["valid_NxL"],
                      "mask_BxL": batch["mask_NxL"], "old_logp_BxL": old_logp_NxL, "adv_B": batch["adv_N"]}
        if replay is not None:
            step_batch["routed_experts_BxLxNxK"] = replay
        g = r.group_size
        update_stats = []
        for _ in range(c.epochs):
            order = self.rng.permutation(r.num_prompts)
            for j in range(c.num_minibatches):
                groups = order[j * self.groups_per_minibatch:(j + 1) * self.groups_per_minibatch]
                rows = np.concatenate([np.arange(gr * g, (gr + 1) * g) for gr in groups]).astype(np.int32)
                group_ids = np.repeat(np.arange(len(groups)), g).astype(np.int32)
                mb = gather_minibatch(step_batch, rows, group_ids, mesh=self.mesh, normalization=c.normalization,
                                      num_groups=len(groups))
                self.params, self.opt_state, stats = update_step(
                    self.params, self.opt_state, mb, c.entropy_coef_at(step), self.model.frozen,
                    graphdef=self.model.graphdef,
                    param_dtypes=self.model.param_dtypes, spec=self.loss_spec, optimizer=cfg.optimizer,
                    total_steps=self.horizon, micro_batches=c.micro_batches)
                update_stats.append(stats)
        update_stats = [to_host(s) for s in update_stats]
        t_update = time.perf_counter() - t0
        return self._metrics(step, rounds, host, kept_groups, agreement, update_stats, t_rollout, t_update,
                             time.perf_counter() - t_start)

    # ------------------------------------------------------------------------------------------ metrics
    def _metrics(self, step, rounds, host, kept_groups, agreement, update_stats, t_rollout, t_update, t_step) -> dict:
        """The step's metrics line (`host`: the step's mask, entropy and valid-token count on this host)."""
        first = rounds[0]
        rewards, lengths = first["rewards"], first["lengths"]
        reasons = [res.finish_reason for res in first["results"]]
        m = {"step": step, "reward_mean": float(np.mean(rewards)), "reward_std": float(np.std(rewards))}
        for name, values in first["per_function"].items():
            m[f"reward/{name}"] = float(np.mean(values))
        g = self.cfg.rollout.group_size
        m.update(self.data.batch_metrics([first["prompt_ids"][i // g] for i in range(len(first["results"]))],
                                         [res.tokens for res in first["results"]]))
        m["frac_zero_std"] = float(first["info"]["frac_zero_std"])
        m["response_len_mean"] = float(np.mean(lengths))
        m["truncation_rate"] = float(np.mean([x == "length" for x in reasons]))
        m["repetition_rate"] = float(np.mean([x == "repetition" for x in reasons]))
        if self.cfg.rollout.dynamic_sampling_rounds:
            m["ds_rounds"] = len(rounds)
            m["ds_kept_groups"] = kept_groups
        resp = host["mask_NxL"] > 0
        m["entropy"] = float(np.mean(host["entropy_NxL"][resp])) if resp.any() else 0.0
        m.update(agreement)
        n_tok = np.array([s["num_tokens"] for s in update_stats])
        w = n_tok / max(n_tok.sum(), 1.0)
        for key in ("clip_frac", "clip_frac_high", "clip_frac_low", "dropped_frac", "is_weight_mean", "ratio_mean",
                    "approx_kl"):
            m[key] = float(np.sum(w * np.array([s[key] for s in update_stats])))
        m["is_weight_max"] = max(s["is_weight_max"] for s in update_stats)
        m["ratio_max"] = max(s["ratio_max"] for s in update_stats)
        m["ratio_min"] = min(s["ratio_min"] for s in update_stats)
        m["loss"] = float(np.mean([s["loss"] for s in update_stats]))
        m["grad_norm"] = float(np.mean([s["grad_norm"] for s in update_stats]))
        m["grad_norm_max"] = max(s["grad_norm"] for s in update_stats)
        m["lr"] = self.learning_rate()
        m["num_updates"] = len(update_stats)
        response_tokens = int(resp.sum())
        trained_tokens = host["valid_tokens"] * self.cfg.cispo.epochs
        m["response_tokens"] = response_tokens
        m["time_step_s"] = t_step
        m["time_rollout_s"] = t_rollout
        m["time_reward_s"] = float(sum(rd["time_reward"] for rd in rounds))
        m["time_update_s"] = t_update
        m["tokens_per_s"] = (response_tokens + trained_tokens) / max(t_step, 1e-9)
        m["rollout_tokens_per_s"] = response_tokens / max(t_rollout, 1e-9)
        m["update_tokens_per_s"] = trained_tokens / max(t_update, 1e-9)
        return m

