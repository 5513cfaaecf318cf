"""Next-token training (SFT / pretraining) on the same machinery as CISPO: optimizer, update step, checkpoints,
metrics. The loss of an optimizer step over rows b and positions t with mask m (tokens that count):

    loss = Σ_bt m_bt · (−log π(x_bt | x_<bt)) / N,      N = Σ_bt m_bt over the WHOLE step
                                                        (`token_normalizer(mask, normalization="batch")`)

computed once per step and sliced over micro-batches, so accumulation sums the micro-batch losses exactly.
"""

from __future__ import annotations

import time

import jax.numpy as jnp
from m1jax.train.data_sources import SftExamples
from m1jax.train.loop import TrainLoop, as_batch, local_rows, to_host
from m1jax.train.losses import token_normalizer
from m1jax.train.run_config import RunConfig
from m1jax.train.update import LossSpec, update_step


class SFTTrainer(TrainLoop):
    """`SFTTrainer(cfg).run()`: one optimizer step per `sft.batch_size` sequences."""

    def __init__(self, cfg: RunConfig, **kw):
        super().__init__(cfg, **kw)
        self.data = SftExamples(cfg.sft.data, cfg.sft.seq_len, tokenizer=self.tokenizer, seed=cfg.seed,
                                vocab_size=self.model.config.vocab_size)
        self.loss_spec = LossSpec(kind="nll", aux_loss_coef=cfg.sft.router_aux_loss_coef,
                                  seq_chunk=cfg.model.logprob_seq_chunk, vocab_chunk=cfg.model.logprob_vocab_chunk)

    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        n = cfg.sft.batch_size
        tb = self.data.next_batch(n, local_rows(n, self.mesh))  # this process's rows of the step's batch
        batch = as_batch({"tokens_BxL": tb.tokens_BxL, "valid_BxL": tb.valid_BxL, "mask_BxL": tb.mask_BxL}, self.mesh,
                         n)
        batch["denom_B"] = token_normalizer(batch["mask_BxL"], normalization="batch")  # N over the whole step
        tokens = jnp.sum(batch["valid_BxL"])
        self.params, self.opt_state, stats = update_step(
            self.params, self.opt_state, batch, 0.0, self.model.frozen, graphdef=self.model.graphdef,
            param_dtypes=self.model.param_dtypes,
            spec=self.loss_spec, optimizer=cfg.optimizer, total_steps=self.horizon,
            micro_batches=cfg.sft.micro_batches)
        stats = to_host({**stats, "tokens": tokens})
        dt = time.perf_counter() - t0
        tokens = int(stats["tokens"])
        return {"step": step, "loss": stats["loss"], "nll": stats["nll"], "num_tokens": int(stats["num_tokens"]),
                "grad_norm": stats["grad_norm"], "lr": self.learning_rate(), "epoch": self.data.order.epoch,
                "time_step_s": dt, "time_update_s": dt, "tokens_per_s": tokens / max(dt, 1e-9)}
