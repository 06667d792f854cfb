"""Search strategies: how the weights and the alphas are optimized.

- ``joint`` (LocalMamba): alpha is one more parameter group of the weights' AdamW, trained on the same
  batches; no weight decay on alpha unless ``alpha_weight_decay`` is set (the original decays it).
- ``bilevel`` (first-order DARTS): alpha has its own Adam (lr 3e-4, betas (0.5, 0.999), wd 1e-3 by
  default) and takes one step on a held-out batch before every weight step.
- ``sampled``: like joint, but each step every layer runs only k of its 8 directions, drawn without
  replacement from softmax(alpha) (Gumbel top-k, one draw per layer shared by all ranks). The skipped
  directions' scans are not computed, which is where the memory goes. The k active outputs are merged
  with weights p_i / sg(sum of the active p): the magnitude of a convex combination, while the
  gradient still reaches every alpha through the softmax's normalization.

During ``alpha_warmup_epochs`` only the weights train (alpha's lr is held at zero).
"""
from __future__ import annotations

import torch

from nas.data import set_epoch
from nas.engine.loop import Task, autocast
from nas.models import arch_parameters, set_active_paths, split_parameters
from nas.search import alphas as alpha_report

STRATEGIES = ("joint", "bilevel", "sampled")
STRATEGY_DEFAULTS = {
    "name": "joint",
    "k": 4,                      # directions kept per layer (derivation; sampled: active per step)
    "alpha_lr": None,            # joint/sampled: the weights' lr; bilevel: 3e-4
    "alpha_weight_decay": None,  # joint/sampled: 0; bilevel: 1e-3
    "alpha_betas": [0.5, 0.999],  # bilevel's Adam
    "alpha_warmup_epochs": 0,
}


def check_strategy(cfg: dict) -> None:
    if cfg["name"] not in STRATEGIES:
        raise ValueError(f"strategy.name: unknown strategy {cfg['name']!r}; expected one of {', '.join(STRATEGIES)}")
    if isinstance(cfg["k"], bool) or not isinstance(cfg["k"], int) or not 1 <= cfg["k"] <= 8:
        raise ValueError(f"strategy.k: expected an int from 1 to 8, got {cfg['k']!r}")
    warm = cfg["alpha_warmup_epochs"]
    if isinstance(warm, bool) or not isinstance(warm, int) or warm < 0:
        raise ValueError(f"strategy.alpha_warmup_epochs: expected an int >= 0, got {warm!r}")


def _no_decay(name: str, p) -> bool:
    return p.ndim <= 1 or getattr(p, "_no_weight_decay", False) or name.endswith(("pos_embed", "cls_token"))


def build_optimizers(model, strategy: dict, train: dict):
    """(weights optimizer, alpha optimizer or None). Norms, biases, A_log, D and position embeddings
    get no weight decay; alpha sits in its own group (joint, sampled) or its own Adam (bilevel)."""
    _, alphas = split_parameters(model)
    alpha_ids = {id(a) for a in alphas}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in alpha_ids:
            (no_decay if _no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": train["weight_decay"], "base_lr": train["lr"], "name": "weights"},
              {"params": no_decay, "weight_decay": 0.0, "base_lr": train["lr"], "name": "weights_no_decay"}]
    alpha_opt = None
    if alphas and strategy["name"] == "bilevel":
        alpha_opt = torch.optim.Adam(alphas, lr=strategy["alpha_lr"] if strategy["alpha_lr"] is not None else 3e-4,
                                     betas=tuple(strategy["alpha_betas"]),
                                     weight_decay=strategy["alpha_weight_decay"]
                                     if strategy["alpha_weight_decay"] is not None else 1e-3)
    elif alphas:
        lr = strategy["alpha_lr"] if strategy["alpha_lr"] is not None else train["lr"]
        groups.append({"params": alphas, "weight_decay": strategy["alpha_weight_decay"] or 0.0, "base_lr": lr,
                       "name": "alpha"})
    for g in groups:
        g["lr"] = g["base_lr"]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=train["lr"]), alpha_opt


def gumbel_top_k(alpha: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct direction indices drawn without replacement from softmax(alpha), sorted."""
    logits = alpha.detach().float().view(-1).cpu().log_softmax(0)
    u = torch.rand(logits.shape, generator=generator).clamp_(1e-10, 1.0)
    return (logits - torch.log(-torch.log(u))).topk(k).indices.sort().values


class SearchTask(Task):
    """The loop's hooks for a search: alpha steps, path sampling and the per-epoch alpha report."""

    def __init__(self, model, train_model, optimizer, strategy: dict, alpha_opt, heldout_loader, logger,
                 run_dir: str, train: dict, seed: int, stage_ends=None):
        self.model, self.train_model, self.optimizer = model, train_model, optimizer
        self.strategy, self.alpha_opt, self.heldout_loader = strategy, alpha_opt, heldout_loader
        self.logger, self.run_dir, self.seed, self.stage_ends = logger, run_dir, seed, stage_ends
        self.label_smoothing, self.amp = train["label_smoothing"], train["amp"]
        self.history = alpha_report.AlphaHistory()
        self._heldout_iter = None
        self._heldout_pass = 0

    def _alpha_frozen(self, epoch: int) -> bool:
        return epoch < self.strategy["alpha_warmup_epochs"]

    def before_step(self, step: int, epoch: int) -> None:
        if self._alpha_frozen(epoch):
            for g in self.optimizer.param_groups:
                if g.get("name") == "alpha":
                    g["lr"] = 0.0
        if self.strategy["name"] == "bilevel" and not self._alpha_frozen(epoch):
            self._alpha_step(epoch)
        if self.strategy["name"] == "sampled":
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)  # same draw on every rank
            set_active_paths(self.model, [gumbel_top_k(a, self.strategy["k"], gen) for a in arch_parameters(self.model)])

    def _next_heldout(self, epoch: int):
        # Every training epoch starts a fresh pass over the held-out set, seeded by (epoch, pass), so a
        # resumed run draws the same held-out batches as an uninterrupted one.
        while True:
            if self._heldout_iter is None:
                set_epoch(self.heldout_loader, epoch * 1000 + self._heldout_pass)
                self._heldout_iter = iter(self.heldout_loader)
            try:
                return next(self._heldout_iter)
            except StopIteration:
                self._heldout_pass += 1
                self._heldout_iter = None

    def _alpha_step(self, epoch: int) -> None:
        images, labels = self._next_heldout(epoch)
        device = next(self.model.parameters()).device
        images, labels = images.to(device), labels.to(device)
        with autocast(self.amp, device):
            loss, _ = Task.loss(self, self.train_model, images, labels)
        loss.backward()
        self.alpha_opt.step()
        self.train_model.zero_grad(set_to_none=True)  # the weights' gradients from this batch are not used

    def eval_model(self, model):
        if self.strategy["name"] == "sampled":
            set_active_paths(self.model, None)
        return model

    def on_epoch_end(self, epoch: int, record: dict) -> dict:
        self._heldout_iter, self._heldout_pass = None, 0
        probs = alpha_report.layer_probs(self.model)
        self.history.record(epoch + 1, probs)
        if self.logger.enabled:
            self.history.write(f"{self.run_dir}/alphas.json")
        return alpha_report.report(self.logger, self.model, probs, epoch + 1, self.run_dir, self.strategy["k"],
                                   self.stage_ends)

    def state_dict(self) -> dict:
        state = {"alpha_history": self.history.epochs}
        if self.alpha_opt is not None:
            state["alpha_optimizer"] = self.alpha_opt.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.history = alpha_report.AlphaHistory(state["alpha_history"])
        if self.alpha_opt is not None:
            self.alpha_opt.load_state_dict(state["alpha_optimizer"])
