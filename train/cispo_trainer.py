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
from m1jax.train.logprobs import probability_agreement
from m1jax.train.loop import TrainLoop, as_batch, rows_per_chunk, to_host
from m1jax.train.losses import token_normalizer
from m1jax.train.reward_stage import build_reward_set, overlong_penalty, score_rollouts, shuffle_within_batch
from m1jax.train.rollout import pack_rollouts, prompt_width, sample_groups
from m1jax.train.run_config import RunConfig, RunConfigError
from m1jax.train.update import LossSpec, cast_params, forward_logprobs, update_step

from m1jax.generation import Engine
from m1jax.loading import param_shardings
from m1jax.sampling import SamplingParams
from m1jax.sharding import make_mesh


def make_prompt_source(cfg: RunConfig, tokenizer):
    if cfg.task.name == "reverse3":
        return Reverse3Prompts(cfg.seed)
    return JsonlPrompts(cfg.task.path, tokenizer, cfg.seed, prompt_field=cfg.task.prompt_field)


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
        """One generation round: prompts, samples, rewards (after the control), advantages, packed arrays."""
        r, g = self.cfg.rollout, self.cfg.rollout.group_size
        prompts = self.data.next_batch(r.num_prompts)
        engine = Engine(self.rollout_model(), self.tokenizer, prefill_chunk=r.prefill_chunk, mesh=self.rollout_mesh)
        t0 = time.perf_counter()
        results = sample_groups(engine, [p.ids for p in prompts], g, self.sampling, run_seed=self.cfg.seed,
                                step=step, first_prompt_index=round_index * r.num_prompts,
                                return_routed_experts=self.cfg.cispo.routing_replay)
        t_gen = time.perf_counter() - t0
        rows = [prompts[i // g] for i in range(len(results))]
        completion_ids = [res.tokens for res in results]
        scores = score_rollouts(self.reward_set, [p.text for p in rows],
                                [self.data.decode(c) for c in completion_ids], [p.ids for p in rows], completion_ids,
                                [res.finish_reason for res in results], [p.fields for p in rows],
                                workers=self.cfg.rewards.workers)
        t_reward = time.perf_counter() - t0 - t_gen
        lengths = np.array([len(c) for c in completion_ids])
        rewards = scores.total.copy()
        per_function = dict(scores.per_function)
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
        width = prompt_width([len(p.ids) for p in prompts], getattr(self.data, "prompt_len", None))
        packed = pack_rollouts([p.ids for p in rows], results, width, r.max_new_tokens)
        return {"prompts": prompts, "results": results, "rows": rows, "rewards": true_rewards, "adv": adv,
                "info": info, "zero_G": zero_G, "per_function": per_function, "packed": packed, "lengths": lengths,
                "time_gen": t_gen, "time_reward": t_reward}

    def _select_groups(self, rounds: list[dict]) -> tuple[dict, int]:
        """Rows of the step: with dynamic sampling the first `num_prompts` groups with non-equal rewards over the
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
        rows = [rounds[k]["packed"] for k, _ in chosen]
        idx = [np.arange(grp * g, (grp + 1) * g) for _, grp in chosen]

        def gather(name):
            return np.concatenate([getattr(p, name)[i] for p, i in zip(rows, idx)])

        mask = gather("mask_NxL") * np.repeat(keep, g)[:, None]
        batch = {"tokens_NxL": gather("tokens_NxL"), "valid_NxL": gather("valid_NxL"), "mask_NxL": mask,
                 "sampler_logp_NxL": gather("sampler_logp_NxL"),
                 "adv_N": np.concatenate([rounds[k]["adv"][i] for (k, _), i in zip(chosen, idx)]) *
                 np.repeat(keep, g)}
        if self.cfg.cispo.routing_replay:
            batch["routed_experts_NxLxNxK"] = gather("routed_experts_NxLxNxK")
        return batch, len(kept)

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
        for sl in rows_per_chunk(n_rows, self.rows_per_micro):
            arrays = {"t": batch["tokens_NxL"][sl], "v": batch["valid_NxL"][sl]}
            if replay is not None:
                arrays["r"] = replay[sl]
            dev = as_batch(arrays, self.mesh)
            lp, ent = forward_logprobs(self.params, dev["t"], dev["v"], self.model.frozen,
                                       routed_experts_BxLxNxK=dev.get("r"), graphdef=self.model.graphdef,
                                       param_dtypes=self.model.param_dtypes, seq_chunk=self.loss_spec.seq_chunk,
                                       vocab_chunk=self.loss_spec.vocab_chunk)
            old_logp.append(lp)
            entropy.append(ent)
        old_logp_NxL = np.asarray(jnp.concatenate(old_logp), np.float32)
        entropy_NxL = np.asarray(jnp.concatenate(entropy), np.float32)
        agreement = probability_agreement(batch["sampler_logp_NxL"], old_logp_NxL, batch["mask_NxL"])

        # μ minibatch updates per epoch over shuffled prompt groups.
        g = r.group_size
        update_stats = []
        for _ in range(c.epochs):
            order = self.rng.permutation(r.num_prompts)
            for j in range(c.num_minibatches):
                groups = order[j * self.groups_per_minibatch:(j + 1) * self.groups_per_minibatch]
                rows = np.concatenate([np.arange(gr * g, (gr + 1) * g) for gr in groups])
                group_ids = np.repeat(np.arange(len(groups)), g).astype(np.int32)
                mask = batch["mask_NxL"][rows]
                denom = token_normalizer(jnp.asarray(mask), jnp.asarray(group_ids), normalization=c.normalization,
                                         num_groups=len(groups))
                arrays = {"tokens_BxL": batch["tokens_NxL"][rows], "valid_BxL": batch["valid_NxL"][rows],
                          "mask_BxL": mask, "old_logp_BxL": old_logp_NxL[rows],
                          "adv_B": batch["adv_N"][rows].astype(np.float32), "denom_B": np.asarray(denom)}
                if replay is not None:
                    arrays["routed_experts_BxLxNxK"] = replay[rows]
                mb = as_batch(arrays, self.mesh)
                self.params, self.opt_state, stats = update_step(
                    self.params, self.opt_state, mb, c.entropy_coef_at(step), self.model.frozen,
                    graphdef=self.model.graphdef,
                    param_dtypes=self.model.param_dtypes, spec=self.loss_spec, optimizer=cfg.optimizer,
                    total_steps=self.horizon, micro_batches=c.micro_batches)
                update_stats.append(stats)
        update_stats = [to_host(s) for s in update_stats]
        t_update = time.perf_counter() - t0
        return self._metrics(step, rounds, batch, kept_groups, entropy_NxL, agreement, update_stats,
                             t_rollout, t_update, time.perf_counter() - t_start)

    # ------------------------------------------------------------------------------------------ metrics
    def _metrics(self, step, rounds, batch, kept_groups, entropy_NxL, agreement, update_stats, t_rollout, t_update,
                 t_step) -> dict:
        first = rounds[0]
        rewards, lengths = first["rewards"], first["lengths"]
        reasons = [res.finish_reason for res in first["results"]]
        m = {"step": step, "reward_mean": float(np.mean(rewards)), "reward_std": float(np.std(rewards))}
        for name, values in first["per_function"].items():
            m[f"reward/{name}"] = float(np.mean(values))
        m.update(self.data.batch_metrics([p.ids for p in first["rows"]], [res.tokens for res in first["results"]]))
        m["frac_zero_std"] = float(first["info"]["frac_zero_std"])
        m["response_len_mean"] = float(np.mean(lengths))
        m["truncation_rate"] = float(np.mean([x == "length" for x in reasons]))
        m["repetition_rate"] = float(np.mean([x == "repetition" for x in reasons]))
        if self.cfg.rollout.dynamic_sampling_rounds:
            m["ds_rounds"] = len(rounds)
            m["ds_kept_groups"] = kept_groups
        resp = batch["mask_NxL"] > 0
        m["entropy"] = float(np.mean(entropy_NxL[resp])) if resp.any() else 0.0
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
        trained_tokens = int(batch["valid_NxL"].sum()) * self.cfg.cispo.epochs
        m["response_tokens"] = response_tokens
        m["time_step_s"] = t_step
        m["time_rollout_s"] = t_rollout
        m["time_reward_s"] = float(sum(rd["time_reward"] for rd in rounds))
        m["time_update_s"] = t_update
        m["tokens_per_s"] = (response_tokens + trained_tokens) / max(t_step, 1e-9)
        m["rollout_tokens_per_s"] = response_tokens / max(t_rollout, 1e-9)
        m["update_tokens_per_s"] = trained_tokens / max(t_update, 1e-9)
        return m

